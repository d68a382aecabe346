"""benchmarks/time_to_accuracy.py's analysis on a made-up report, checked by hand (no processes, no timing)."""

import pytest

from tests.benchmark_scripts import load_script


@pytest.fixture(scope="module")
def tta():
    return load_script("time_to_accuracy")


def _result(method, step_s, losses, *, every=10):
    return {"method": method, "collective": "allreduce", "lr": 1e-3, "optimizer": "adamw",
            "step_times_s": [step_s] * 40, "bytes_per_step_per_rank": 100.0, "wire_tx_bytes_per_step_per_node": None,
            "params_in_sync": True,
            "evals": [{"step": i * every, "val_loss": v} for i, v in enumerate(losses)] if losses else []}


def test_target_steps_time_and_speedup_by_hand(tta):
    report = {"steps": 40, "results": [
        _result("fp32_adamw", 0.5, [4.0, 3.0, 2.5, 2.2, 2.0]),    # target: its loss at step 30 = 2.2
        _result("birder", 0.1, [4.0, 3.2, 2.6, 2.4, 2.0]),        # reaches 2.2 half-way from step 30 to 40
        _result("slow", 0.1, [4.0, 3.9, 3.8, 3.7, 3.6]),          # never
        _result("compute", 0.08, []),                              # timing only
    ]}
    a = tta.analyse(report)
    assert (a["target_step"], a["target"]) == (30, 2.2)
    rows = a["rows"]
    assert rows["fp32_adamw"]["steps_to_target"] == 30 and rows["fp32_adamw"]["time_to_target_s"] == pytest.approx(15)
    assert rows["birder"]["steps_to_target"] == pytest.approx(35)
    assert rows["birder"]["time_to_target_s"] == pytest.approx(3.5)
    assert rows["birder"]["speedup_vs_fp32_adamw"] == pytest.approx(15 / 3.5)
    assert rows["slow"]["steps_to_target"] is None and rows["slow"]["speedup_vs_fp32_adamw"] is None
    assert rows["birder"]["final_val_loss"] == 2.0 and "final_val_loss" not in rows["compute"]
    # ideal: 0.5 s = 0.08 s of compute + 0.42 s of exchange, which a 32x smaller message makes 0.013 s
    assert a["ideal_speedup"] == pytest.approx(0.5 / (0.08 + 0.42 / 32))


def test_seed_summary_is_per_seed_differences(tta):
    runs = []
    for seed, (ref, birder) in enumerate([(2.0, 2.02), (2.1, 2.10), (2.2, 2.25)]):
        report = {"steps": 40, "results": [_result("fp32_adamw", 0.5, [4, 3, 2.5, ref + 0.1, ref]),
                                           _result("birder", 0.1, [4, 3, 2.5, birder + 0.2, birder])]}
        runs.append({"seed": seed, "analysis": tta.analyse(report)})
    s = tta.seed_summary(runs)["birder"]
    assert s["final_mean"] == pytest.approx(6.37 / 3) and s["gap_mean"] == pytest.approx(0.07 / 3)
    assert s["gap_std"] == pytest.approx(0.0251661, rel=1e-4) and s["seeds"] == [0, 1, 2]
    # the recipe of the method's optimizer, then the warm-up, then the method's own overrides (they win), the lr
    assert tta.method_overrides("x", "compression=none optim=adamw optim.grad_clip=null", 2e-3, warmup=5) == (
        "optim.betas=[0.9,0.99] optim.grad_clip=1.0 optim.weight_decay=0.0 optim.warmup_steps=5 "
        "compression=none optim=adamw optim.grad_clip=null optim.lr=0.002")
