"""benchmarks/hierarchical_scale.py's paper table: pure byte formulas, checked by hand (no processes, no timing)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "hierarchical_scale.py"


@pytest.fixture(scope="module")
def scale():
    spec = importlib.util.spec_from_file_location("hierarchical_scale", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(rows, method, num_nodes):
    (row,) = [r for r in rows if r["method"] == method and r["num_nodes"] == num_nodes]
    return row


def test_bucket_sizes_follow_ddp(scale):
    # 1 MiB first bucket (262,144 fp32), then 25 MiB (6,553,600); 25M params -> 1 + 3 full + rest
    sizes = scale.bucket_sizes(25_000_000)
    assert sizes[:4] == [262_144, 6_553_600, 6_553_600, 6_553_600]
    assert sum(sizes) == 25_000_000


def test_paper_table_by_hand(scale):
    d = 25_000_000
    rows = scale.paper_table([d], [1, 2, 64], gpus_per_node=8, rates_bit_s=[10e9])
    # One node: nothing crosses a node boundary, whatever the method.
    assert all(r["inter_bytes_per_node"] == 0 for r in rows if r["num_nodes"] == 1)
    # fp32 ring over n = 16 ranks, one ring link leaves each node: 2 * (n-1)/n * 4d bytes.
    fp32 = _row(rows, "fp32", 2)
    assert fp32["inter_bytes_per_node"] == pytest.approx(2 * 15 / 16 * 4 * d)  # 187.5 MB
    assert fp32["comm_s"]["10gbit"] == pytest.approx(187.5e6 * 8 / 10e9)  # 0.15 s
    # hierarchical, all-gather form: each of the 8 local ranks all-gathers its d/8 chunk (1 bit each)
    # with the other node: per node (N - 1) * d / 8 bytes = 1 bit per parameter. Bucket sizes are
    # multiples of 64 elements, so the chunks need no padding and the count is exact.
    hier = _row(rows, "hierarchical allgather", 2)
    assert hier["inter_bytes_per_node"] == pytest.approx(d / 8)
    assert hier["inter_bits_per_param"] == pytest.approx(1.0)
    # ... and grows with the node count: 63 bits per parameter at 64 nodes (an all-gather).
    assert _row(rows, "hierarchical allgather", 64)["inter_bits_per_param"] == pytest.approx(63.0, rel=1e-4)
    # The reduce-scatter form (issue 12): 2 (N - 1) / N bits per parameter per node, 1 at N = 2, < 2 always.
    assert _row(rows, "hierarchical reduce_scatter", 2)["inter_bits_per_param"] == pytest.approx(1.0, rel=1e-3)
    assert _row(rows, "hierarchical reduce_scatter", 64)["inter_bits_per_param"] == pytest.approx(2 * 63 / 64, rel=1e-3)
    # auto: the all-gather form at 2 nodes, the reduce-scatter form beyond.
    assert _row(rows, "hierarchical (auto)", 2)["inter_bytes_per_node"] == hier["inter_bytes_per_node"]
    assert _row(rows, "hierarchical (auto)", 64)["inter_bits_per_param"] < 2.1
    # PowerSGD r4 on 1024 x 1024 matrices: factors of 2 * 1024 * 4 floats per 2**20 elements, ring all-reduced.
    assert _row(rows, "powersgd r4", 2)["inter_bytes_per_node"] == pytest.approx(
        2 * 15 / 16 * 4 * d * (2 * 1024 * 4 / 2**20))
    # allgather over 16 ranks: each rank sends 15 * d/8 bytes, 2 of the 16 ring links cross.
    assert _row(rows, "allgather", 2)["inter_bytes_per_node"] == pytest.approx(8 * 15 * d / 8 * 2 / 16)


def test_paper_markdown_has_every_row(scale):
    rows = scale.paper_table([25_000_000], [2], gpus_per_node=8)
    text = scale.paper_markdown(rows)
    assert text.count("\n") == len(rows) + 1  # header + separator + one line per row
    assert "| 25.0M | 2 x 8 | hierarchical allgather | 3.12 | 1.00 | 0.017 |" in text


@pytest.fixture(scope="module")
def common(scale):  # hierarchical_scale put benchmarks/ on sys.path
    import common

    return common


def test_results_files_named_and_written_in_one_place(common, tmp_path):
    assert common.results_path("kernels", hardware="AMD EPYC", date="2026-12-01").name == "kernels_amd-epyc_2026-12-01.md"
    assert common.results_path("supernet_vs_standalone", "", date="2026-12-01", tag="kd0.5").name == (
        "supernet_vs_standalone_2026-12-01_kd0.5")
    common.write_results(tmp_path / "x_kd0.5", "| a |\n", {"machine": common.machine_description()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_kd0.5.json", "x_kd0.5.md"]
    machine = (tmp_path / "x_kd0.5.json").read_text()
    for key in ("cpu", "cores", "mem_gib", "kernel", "python", "torch", "load_avg_1min_at_start"):
        assert f'"{key}"' in machine


def test_no_benchmark_describes_the_machine_itself():
    # The machine description lives in benchmarks/common.py only (issue 15).
    for script in SCRIPT.parent.glob("*.py"):
        if script.name == "common.py":
            continue
        text = script.read_text()
        for needle in ("/proc/cpuinfo", "/proc/loadavg", "getloadavg", "lscpu", "platform."):
            assert needle not in text, f"{script.name} reads {needle}: use benchmarks/common.py"
