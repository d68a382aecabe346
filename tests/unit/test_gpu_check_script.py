"""benchmarks/gpu_check.{sh,py} on CPU: the script's own logic, so the first GPU call is not spent on its bugs.

The GPU figures come from ``bash benchmarks/gpu_check.sh OUT`` on a machine with a GPU (docs/gpu.md).
Here: the kernels, hook and collectives parts at small size on CPU (numba against the torch
reference), results written after every part even when one fails, the shell script's one-line
stop without CUDA and its time budget, the stream figure that counts the hook's own kernels by
name, the sync count that reads 0 (not None), and the carried wheels equal to what the checked
code imports beyond the device image.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # so that spawned workers unpickle its functions from this module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_parts_run_on_cpu(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29731")
    report = gpu_check.main([str(tmp_path), "--device", "cpu", "--small", "--part", "kernels", "--part", "hook",
                             "--part", "collectives"])
    assert report["kernels"]["all_equal"] is True and report["kernels"]["checks"] > 80, report["kernels"]["failed"]
    assert report["hook"]["params_equal_torch_path"] is True and report["hook"]["bf16_params_equal_torch_path"] is True
    collectives = report["collectives"]["world_2"]
    assert report["collectives"]["all_equal"] is True, collectives
    assert {"allgather", "two_phase", "two_phase+requantize", "hierarchical", "hierarchical+reduce_scatter"} <= set(
        collectives)
    assert json.loads((tmp_path / "gpu_check.json").read_text())["collectives"]["all_equal"] is True
    assert (tmp_path / "trace_birder.json").is_file()


def test_each_part_is_written_when_it_ends(gpu_check, tmp_path, monkeypatch):
    def run_part(part, device, small, out_dir):
        if part == "hook":
            raise RuntimeError("boom")
        seen = json.loads((tmp_path / "gpu_check.json").read_text()) if part == "collectives" else {}
        return {"ok": part, "saw_before": sorted(seen)}

    monkeypatch.setattr(gpu_check, "run_part", run_part)
    report = gpu_check.main([str(tmp_path), "--device", "cpu", "--part", "env", "--part", "hook",
                             "--part", "collectives"])
    assert report["hook"]["error"] == "RuntimeError: boom"
    assert "env" in report["collectives"]["saw_before"] and "hook" in report["collectives"]["saw_before"]
    gpu_check.main([str(tmp_path), "--record-failure", "bench", "timed out after 70s"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["bench"] == {"error": "timed out after 70s"} and saved["env"] == {"ok": "env", "saw_before": []}


def test_cuda_is_required_unless_asked_for_cpu(gpu_check, tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as stop:
        gpu_check.main([str(tmp_path), "--part", "kernels"])
    assert stop.value.code == 2 and not (tmp_path / "gpu_check.json").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the stop on a machine without CUDA")
def test_the_shell_script_stops_at_once_without_cuda(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 2
    assert out.stdout.strip().splitlines() == [
        f"gpu_check: no CUDA device (torch.cuda.is_available() is False in {sys.executable}): nothing checked"]
    assert (tmp_path / "out" / "summary.txt").read_text() == out.stdout


def test_the_shell_script_fits_the_device_call():
    text = SCRIPT.read_text()
    limits = {name: int(limit) for name, limit in re.findall(r"^run_part (\w+) (\d+) ", text, re.MULTILINE)}
    assert list(limits) == ["env", "kernels", "hook", "collectives", "bench", "tests", "hsdp", "app"]
    assert sum(limits.values()) <= 420  # 7 minutes of parts in a call of at most 10
    assert f"parts=${{PARTS:-{' '.join(limits)}}}" in text
    # at most 8 files come back: those written to $out
    written = set(re.findall(r'"\$out/([\w.]+)"', text)) | {"log.txt", "summary.txt", "gpu_check.json"}
    written = {name for name in written if not name.startswith("trace_birder.json") or name.endswith(".gz")}
    assert len(written) <= 8, written
    docs = (ROOT / "docs" / "gpu.md").read_text()
    assert 'command:   bash benchmarks/gpu_check.sh "$OUT"' in docs and 'carry:     [".whl"]' in docs
    for name, limit in limits.items():
        assert re.search(rf"^\| `{name}` \| {limit} s \|", docs, re.MULTILINE), name


def test_streams_count_the_hooks_own_kernels_by_name(gpu_check):
    def kernel(name, stream):
        return {"cat": "kernel", "name": name, "args": {"stream": stream}}

    events = [kernel("_compress_kernel", 13), kernel("_compress_kernel", 13), kernel("_pack_counts_kernel", 13),
              kernel("void at::native::vectorized_elementwise_kernel<4>", 13),  # ATen on the hook's stream: not counted
              kernel("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", 7), kernel("sm90_xmma_gemm_f32f32", 7),
              kernel("_apply_packed_kernel", 7), {"cat": "cpu_op", "name": "_compress_kernel"}]
    streams = gpu_check.kernel_streams(events)
    assert streams["hook_kernels"] == 3 and streams["hook_streams"] == ["13"] and streams["hook_on_own_stream"]
    assert streams["step_streams"] == ["7"] and streams["step_on_gemm_stream"]
    assert streams["by_stream"]["13"] == {"hook": 3, "other": 1}
    # the apply is step()'s, not the hook's: on the GEMM stream it does not make the hook share a stream
    shared = gpu_check.kernel_streams(events + [kernel("_requantize_kernel", 7)])
    assert not shared["hook_on_own_stream"]


def test_sync_counts_read_zero_not_none(gpu_check):
    with gpu_check.SyncCounter() as counter:
        pass
    assert counter.by_thread == {"MainThread": 0, "birder-comm": 0}

    def warn():
        warnings.warn("called a synchronizing CUDA operation", UserWarning)

    with gpu_check.SyncCounter() as counter:
        thread = threading.Thread(target=warn, name="birder-comm")
        thread.start()
        thread.join()
        warn()
        warnings.warn("something else", UserWarning)
    assert counter.by_thread == {"MainThread": 1, "birder-comm": 1}


def test_carried_wheels_are_what_the_checked_code_imports_beyond_the_image(gpu_check):
    # A fresh interpreter imports what the device call runs; its third-party modules must be on the image
    # or carried, and nothing carried may go unused.
    probe = f"""
import importlib, json, sys
sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'benchmarks')!r}]
import gpu_check, bench_kernels, dist_supernet.train.__main__, dist_supernet.optim
for name in ("test_gpu_paths", "test_apply", "test_compress", "test_decode", "test_requantize", "test_dispatch"):
    importlib.import_module("tests.kernels." + name)
import sklearn.datasets, matplotlib.pyplot  # the app's data (digits) and plots, imported when it runs
local = {{"gpu_check", "bench_kernels", "common", "tests", "dist_supernet", "hydra_plugins"}}
tops = {{m.split(".")[0] for m in sys.modules}} - set(sys.stdlib_module_names) - local
print(json.dumps(sorted(t for t in tops if not t.startswith("_") and "__mypyc" not in t)))  # mypyc: compiled parts
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    imported = set(json.loads(out.stdout.strip().splitlines()[-1]))
    carried = set(gpu_check.CARRIED_WHEELS)
    assert carried <= imported, carried - imported  # nothing carried in vain
    assert imported - carried <= gpu_check.IMAGE_MODULES, imported - carried - gpu_check.IMAGE_MODULES
