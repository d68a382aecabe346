"""Evolutionary search, single process: constraint always met, beats random search on a synthetic objective."""

import random

import pytest

from dist_supernet.supernet import ElasticViT, OFACNN
from dist_supernet.supernet.search import evolutionary_search, random_search


def synthetic_accuracy(space, seed=0):
    """A fixed random linear score over gene choice indices: some genes want big choices, some small."""
    rng = random.Random(seed)
    weights = [rng.uniform(-1, 1) for _ in space.genes()]

    def evaluate(arch):
        values = space.arch_to_genes(arch)
        return sum(w * g.choices.index(v) / max(1, len(g.choices) - 1)
                   for w, g, v in zip(weights, space.genes(), values) if v is not None)

    return evaluate


@pytest.mark.parametrize("space", [OFACNN(1, 8, 10), ElasticViT(1, 28, 10)], ids=["ofa_cnn", "elastic_vit"])
def test_search_meets_the_limit_and_beats_random(space):
    flops_limit = (space.flops(space.min_arch()) + space.flops(space.max_arch())) // 2
    params_limit = space.params(space.max_arch()) * 0.6
    evaluate = synthetic_accuracy(space)
    result = evolutionary_search(space, evaluate, flops_limit=flops_limit, params_limit=params_limit,
                                 population_size=16, num_generations=8, mutate_prob=0.2, seed=0)
    assert result.evaluated and all(e["flops"] <= flops_limit and e["params"] <= params_limit
                                    for e in result.evaluated)
    assert space.flops(result.best_arch) <= flops_limit and result.best_score == evaluate(result.best_arch)
    assert result.history == sorted(result.history) and len(result.history) == 9

    budget = len(result.evaluated)
    baseline = random_search(space, evaluate, budget, flops_limit=flops_limit, params_limit=params_limit, seed=0)
    assert all(e["flops"] <= flops_limit for e in baseline.evaluated)
    assert result.best_score > baseline.best_score

    again = evolutionary_search(space, evaluate, flops_limit=flops_limit, params_limit=params_limit,
                                population_size=16, num_generations=8, mutate_prob=0.2, seed=0)
    assert again.best_arch == result.best_arch and again.history == result.history


def test_restricted_search_only_varies_elastic_dims():
    space = OFACNN(1, 8, 10)
    result = evolutionary_search(space, synthetic_accuracy(space, 1), population_size=6, num_generations=2,
                                 elastic=["kernel"])
    assert all(e["arch"]["depth"] == space.max_arch()["depth"] for e in result.evaluated)


@pytest.mark.parametrize("kwargs, match", [
    ({"flops_limit": 1}, "flops_limit"),
    ({"population_size": 1}, "search.population_size"),
    ({"parent_ratio": 0.6, "mutation_ratio": 0.6}, "parent_ratio"),
    ({"mutate_prob": 1.5}, "search.mutate_prob"),
])
def test_bad_search_settings_name_the_key(kwargs, match):
    space = OFACNN(1, 8, 10)
    with pytest.raises(ValueError, match=match):
        evolutionary_search(space, lambda a: 0.0, **kwargs)
