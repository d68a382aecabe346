"""benchmarks/diloco.py's analysis on made-up runs, checked by hand (no processes, no timing)."""

import argparse

import pytest

from tests.benchmark_scripts import load_script


@pytest.fixture(scope="module")
def diloco():
    return load_script("diloco", "diloco_bench")


def _run(method, seed, steps, final, curve, inter):
    return {"link": "10mbit", "groups": 2, "seed": seed, "method": method, "steps": steps, "final_val_loss": final,
            "inter_bytes_per_step_per_node": inter, "wall_time_s": curve[-1][0], "params_in_sync": True,
            "curve": [(t, loss, step) for t, loss, step in curve]}


def test_time_to_the_same_seeds_ddp_loss_bytes_and_steps_by_hand(diloco):
    results = [
        _run("ddp_adamw", 0, 600, 2.5, [(100.0, 3.0, 300), (200.0, 2.5, 600)], 4000.0),
        _run("ddp_adamw", 1, 600, 2.6, [(100.0, 3.0, 300), (200.0, 2.6, 600)], 4000.0),
        # seed 0 reaches 2.5 at 30 s; seed 1 reaches 2.6 (its own seed's target) at 20 s: mean 25
        _run("diloco_onebit", 0, 1800, 2.45, [(10.0, 2.9, 600), (30.0, 2.5, 1200), (45.0, 2.45, 1800)], 4.0),
        _run("diloco_onebit", 1, 1800, 2.55, [(20.0, 2.6, 600), (40.0, 2.55, 1800)], 4.0),
        _run("diloco_fp32", 0, 1800, 2.7, [(50.0, 2.8, 900), (60.0, 2.7, 1800)], 128.0),  # never reaches 2.5
    ]
    rows = {r["method"]: r for r in diloco.summarize(results, "10mbit", 2, ["ddp_adamw", "diloco_onebit",
                                                                               "diloco_fp32", "birder"])}
    assert "birder" not in rows  # no runs: no row
    one = rows["diloco_onebit"]
    assert one["time_to_ddp_loss_s"] == pytest.approx(25.0) and one["reached"] == "2/2"
    assert one["final_val_loss"] == pytest.approx(2.5) and one["seeds"] == 2 and one["steps"] == 1800
    assert one["fewer_bytes_than_ddp"] == pytest.approx(1000.0)
    assert one["fewer_bytes_than_diloco_fp32"] == pytest.approx(32.0)
    assert rows["diloco_fp32"]["time_to_ddp_loss_s"] is None and rows["diloco_fp32"]["reached"] == "0/1"
    assert rows["ddp_adamw"]["time_to_ddp_loss_s"] == pytest.approx(200.0) and rows["ddp_adamw"]["steps"] == 600
    table = diloco.markdown_table(list(rows.values()), "10mbit")
    assert table[0].startswith("| method | inner steps |") and len(table) == 2 + 3
    assert "| diloco_onebit | 1800 | 2.5000 ± 0.0707 (2) | 4.0 | 1000x | 32.0x | 25.0 [2/2] |" in table[3]


def test_long_steps_go_to_every_method_but_ddp_adamw(diloco):
    args = argparse.Namespace(steps=600, long_steps=1800)
    assert [diloco.method_steps(m, args) for m in ("ddp_adamw", "birder", "diloco_onebit_streamed")] == [600, 1800,
                                                                                                         1800]
    assert diloco.method_steps("birder", argparse.Namespace(steps=600, long_steps=None)) == 600
