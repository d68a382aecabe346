"""benchmarks/update_rule.py: the simulated rules train, and their first steps are the rules' own arithmetic."""

import pytest

from tests.benchmark_scripts import load_script

SETTINGS = dict(steps=2, workers=2, global_batch=4, seed=0, beta=0.9, beta2=0.999, clip=1.0, warmup=1, eval_every=2)


@pytest.fixture(scope="module")
def rule():
    return load_script("update_rule")


def test_every_rule_trains_two_steps_and_the_lr_matters(rule):
    finals = {}
    for name, lr in (("abs", 5e-4), ("rms_exact", 2e-3), ("rms_mean", 2e-3)):
        row = rule.run_variant(name, lr, SETTINGS)
        assert [s for s, _ in row["curve"]] == [2]
        finals[name] = row["final"]
        assert 0 < row["final"] < 6
    # a tiny lr barely moves the loss from its start; the real lr does
    assert rule.run_variant("rms_exact", 1e-9, SETTINGS)["final"] > finals["rms_exact"] + 0.05


def test_a_variant_that_is_not_a_rule_is_refused(rule, capsys):
    with pytest.raises(SystemExit):
        rule.main(["--variants", "lion@1e-3"])
    assert "'lion@1e-3' is not NAME@LR" in capsys.readouterr().err
