"""benchmarks/gpu_check.py runs on CPU (a smoke test of the GPU validation script's own code).

The GPU figures come from ``bash benchmarks/gpu_check.sh OUT`` on a machine with a GPU; this only
keeps the script from rotting where there is none: the kernel part at small size must find every
kernel equal to the reference, and the hook part must find the compiled path equal to the torch path.
"""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_runs_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29731")
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main([str(tmp_path), "--device", "cpu", "--small", "--parts", "kernels,hook"])
    kernel_checks = {k: v for k, v in report["kernels"].items() if isinstance(v, dict)}
    assert kernel_checks and all(v["all"] for v in kernel_checks.values()), kernel_checks
    assert report["hook"]["params_equal_torch_path"] is True
    assert (tmp_path / "gpu_check.json").is_file() and (tmp_path / "trace_birder.json").is_file()
