"""One registry per extension point: a toy collective and a toy baseline (tests/toy_plugin.py), loaded as a plugin.

The config accepts them (Hydra compose + validate) once ``plugins=[tests.toy_plugin]`` is set and
rejects them without; the benchmarks list them; registering clashing names fails. The same toys
train in a real torchrun sweep in tests/distributed/test_registries.py.
"""

import dataclasses
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from dist_supernet.comm import BASELINES, COLLECTIVES, Baseline, OneBitCollective, register_baseline
from dist_supernet.comm import register_collective
from dist_supernet.plugins import load_plugins
from dist_supernet.train.config import ConfigError, validate
from tests.configs import compose_train

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "tests.toy_plugin"
TOY_COLLECTIVE, TOY_BASELINE = "toy_count_allreduce", "toy_chunked"


@pytest.fixture
def unloaded():
    """Leave the registries as they were: the toys are registered by whatever imports the plugin."""
    COLLECTIVES.pop(TOY_COLLECTIVE, None), BASELINES.pop(TOY_BASELINE, None)
    collectives, baselines = dict(COLLECTIVES), dict(BASELINES)
    sys.modules.pop(PLUGIN, None)
    yield
    sys.modules.pop(PLUGIN, None)
    COLLECTIVES.clear(), COLLECTIVES.update(collectives)
    BASELINES.clear(), BASELINES.update(baselines)


def _compose(*overrides):
    return compose_train("model=mlp", *overrides)


def _load_script(name):
    if str(REPO / "benchmarks") not in sys.path:  # the scripts import their shared benchmarks/common.py
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_accepts_the_toys_only_with_the_plugin_and_checks_their_schema(unloaded):
    with pytest.raises(ConfigError, match=r"^compression\.collective=toy_count_allreduce: expected one of auto, "
                                          r"allgather, two_phase, hierarchical$"):
        validate(_compose(f"compression.collective={TOY_COLLECTIVE}"))
    with pytest.raises(ConfigError, match=r"^compression\.name=toy_chunked: expected one of birder, none, fp16, "
                                          r"bf16, powersgd$"):
        validate(_compose("compression=none", f"compression.name={TOY_BASELINE}"))

    plugin = f"plugins=[{PLUGIN}]"
    run = validate(_compose(plugin, f"compression.collective={TOY_COLLECTIVE}"))
    assert (run.compression.name, run.compression.collective) == ("birder", TOY_COLLECTIVE)
    assert COLLECTIVES[TOY_COLLECTIVE].needs_node_groups is False
    # The baseline's own key: its default where the yaml leaves it out, its declared type and range.
    run = validate(_compose(plugin, "compression=none", f"compression.name={TOY_BASELINE}"))
    assert type(run.compression) is BASELINES[TOY_BASELINE].config and run.compression.num_chunks == 2
    run = validate(_compose(plugin, "compression=none", f"compression.name={TOY_BASELINE}", "+compression.num_chunks=5"))
    assert run.compression.num_chunks == 5
    for value, reason in (("0", "must be in [1, 64]"), ("65", "must be in [1, 64]"), ("two", "expected int")):
        with pytest.raises(ConfigError, match=rf"^compression\.num_chunks={value}: {re.escape(reason)}$"):
            validate(_compose(plugin, "compression=none", f"compression.name={TOY_BASELINE}",
                              f"+compression.num_chunks={value}"))
    # A baseline cannot take birder's keys, nor a 1-bit collective.
    with pytest.raises(ConfigError, match=r"^compression\.collective=toy_count_allreduce: compression=toy_chunked "
                                          r"uses DDP's allreduce; the 1-bit collectives \(auto, .*toy_count_allreduce\)"):
        validate(_compose(plugin, "compression=none", f"compression.name={TOY_BASELINE}",
                          f"compression.collective={TOY_COLLECTIVE}"))
    with pytest.raises(ConfigError, match=r"^compression\.requantize=true: unknown key \(expected one of name, "
                                          r"collective, num_nodes, num_chunks\)$"):
        validate(_compose(plugin, "compression=none", f"compression.name={TOY_BASELINE}", "+compression.requantize=true"))
    with pytest.raises(ConfigError, match=r"^plugins=\[tests\.no_such_plugin\]: cannot import tests\.no_such_plugin "):
        validate(_compose("plugins=[tests.no_such_plugin]"))
    with pytest.raises(ConfigError, match=r"^plugins=3: expected a list of module names"):
        validate(_compose("plugins=3"))


def test_benchmarks_list_the_toys(unloaded, capsys):
    step_worker = _load_script("step_worker")
    assert step_worker.method_names() == ("compute", "fp32", "fp16", "powersgd", "allgather", "two_phase",
                                          "hierarchical", "hierarchical_rs", "hsdp_local", "hsdp_fp32",
                                          "hsdp_birder")  # bf16 is NCCL only
    with pytest.raises(SystemExit) as exit_info:
        step_worker.main(["--plugins", PLUGIN, "--help"])
    assert exit_info.value.code == 0
    assert f"powersgd, {TOY_BASELINE}, allgather, two_phase, hierarchical, {TOY_COLLECTIVE}," in \
        " ".join(capsys.readouterr().out.split())
    assert step_worker.baseline_methods()[TOY_BASELINE] == TOY_BASELINE
    slow_link = _load_script("slow_link")
    with pytest.raises(SystemExit):
        slow_link.main(["--plugins", PLUGIN, "--help"])
    assert f"{TOY_COLLECTIVE}" in capsys.readouterr().out and "hierarchical_rs" not in slow_link.step_worker.method_names(forms=False)
    with pytest.raises(SystemExit) as exit_info:
        step_worker.main(["--plugins", "tests.no_such_plugin", "--help"])
    assert exit_info.value.code == 2 and "--plugins=[tests.no_such_plugin]: cannot import" in capsys.readouterr().err


def test_registering_a_clashing_or_malformed_entry_fails(unloaded):
    load_plugins([PLUGIN])
    load_plugins([PLUGIN])  # importing again is harmless

    class Impostor(OneBitCollective):
        name = TOY_COLLECTIVE

    with pytest.raises(ValueError, match=r"collective name='toy_count_allreduce': already registered by "
                                         r"tests\.toy_plugin\.ToyCountAllReduce"):
        register_collective(Impostor)
    for name in ("auto", "base", "two words"):
        with pytest.raises(ValueError, match="must be an identifier other than 'auto'"):
            register_collective(type("Bad", (OneBitCollective,), {"name": name}))
    with pytest.raises(TypeError, match="expected a subclass of OneBitCollective"):
        register_collective(object)

    with pytest.raises(ValueError, match=r"compression='birder': a baseline name must be"):
        register_baseline(type("Bad", (Baseline,), {"name": "birder"}))

    @dataclasses.dataclass
    class Loose:
        name: str = "loose"

    with pytest.raises(TypeError, match="config must be a dataclass subclass of BaselineConfig"):
        register_baseline(type("Bad", (Baseline,), {"name": "loose", "config": Loose}))
    with pytest.raises(ValueError, match=r"compression='none': already registered by dist_supernet\.comm\.baselines"):
        register_baseline(type("Bad", (Baseline,), {"name": "none"}))
    assert "loose" not in BASELINES and COLLECTIVES[TOY_COLLECTIVE].__module__ == PLUGIN


def test_baseline_config_from_keywords_is_checked_like_the_config():
    from dist_supernet.comm import baseline_config

    assert baseline_config("powersgd", rank=2).rank == 2 and baseline_config("fp16").num_nodes is None
    with pytest.raises(ValueError, match=r"^compression\.rank=0: must be >= 1$"):
        baseline_config("powersgd", rank=0)
    with pytest.raises(ValueError, match=r"^compression\.rank=2: unknown key for compression=none"):
        baseline_config("none", rank=2)
    with pytest.raises(ValueError, match=r"^compression=nope: expected one of birder, none, fp16, bf16, powersgd"):
        baseline_config("nope")
    # Types, as the config pass checks them: an int key refuses a string, a bool and a float.
    for bad in ("4", True, 2.5):
        with pytest.raises(ValueError, match=r"^compression\.rank=.*: must be an int$"):
            baseline_config("powersgd", rank=bad)
    with pytest.raises(ValueError, match=r"^compression\.num_nodes=.*: must be an int or null$"):
        baseline_config("fp16", num_nodes="2")


def test_registry_and_schema_examples_run():
    import doctest

    import dist_supernet.comm.registry
    import dist_supernet.schema

    for module in (dist_supernet.comm.registry, dist_supernet.schema):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
