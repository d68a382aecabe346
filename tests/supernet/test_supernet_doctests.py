"""The ``Example::`` blocks of the supernet package run as written."""

import doctest
import importlib

import pytest

MODULES = ["__init__", "bn_recalibration", "config", "distillation", "elastic", "elastic_vit", "export", "families",
           "ofa_cnn", "plot", "progressive", "sampler", "search", "space", "subnets"]


@pytest.mark.parametrize("name", MODULES)
def test_examples(name):
    module = importlib.import_module("dist_supernet.supernet" + ("" if name == "__init__" else f".{name}"))
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
