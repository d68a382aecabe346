"""Samplers: same archs for the same (seed, step) anywhere, restriction honoured, checkpoint state; phases."""

import pytest

from dist_supernet.supernet import ElasticViT, OFACNN
from dist_supernet.supernet.progressive import check_phases, elastic_at
from dist_supernet.supernet.sampler import (
    ComplexityAwareSampler,
    SandwichSampler,
    UniformSampler,
    build_sampler,
    step_rng,
)


@pytest.fixture(scope="module")
def space():
    return OFACNN(1, 8, 10)


def test_step_rng_depends_on_seed_step_and_stream():
    draw = lambda *key: step_rng(*key).random()  # noqa: E731
    assert draw(1, 2, "a") == draw(1, 2, "a")
    assert len({draw(1, 2, "a"), draw(1, 3, "a"), draw(2, 2, "a"), draw(1, 2, "b")}) == 4


def test_uniform_is_a_function_of_seed_and_step(space):
    rank0, rank1 = UniformSampler(space, seed=5, num_archs=3), UniformSampler(space, seed=5, num_archs=3)
    steps = [0, 7, 3, 7]
    assert [rank0.sample(s) for s in steps] == [rank1.sample(s) for s in reversed(steps)][::-1]
    assert rank0.sample(0) != rank0.sample(1)
    assert UniformSampler(space, seed=6, num_archs=3).sample(0) != rank0.sample(0)


def test_sandwich_has_max_min_and_honours_restriction(space):
    sampler = SandwichSampler(UniformSampler(space, seed=0, num_archs=2))
    archs = sampler.sample(3, elastic=["kernel"])
    assert len(archs) == 4
    assert archs[0] == space.max_arch() and archs[1] == space.min_arch(["kernel"])
    full = space.max_arch()
    for arch in archs:
        assert {k: arch[k] for k in ("depth", "width_mult", "expand_ratio")} == {
            k: full[k] for k in ("depth", "width_mult", "expand_ratio")
        }
    assert any(arch["kernel_size"] != full["kernel_size"] for arch in archs[1:])


def test_complexity_aware_band_walks_slowly_and_is_resumable(space):
    sampler = ComplexityAwareSampler(space, seed=1, num_archs=2, num_bins=6)
    levels = [sampler.level_at(step) for step in range(60)]
    assert all(abs(a - b) <= 1 for a, b in zip(levels, levels[1:]))
    assert len(set(levels)) >= 3 and all(0 <= lv < 6 for lv in levels)
    inside = 0
    history = []
    for step in range(30):
        low, high = sampler.band(step)
        archs = sampler.sample(step)
        history.append(archs)
        inside += sum(low <= space.flops(a) <= high for a in archs)
    assert inside >= 0.95 * 60  # uniform draws, then steering gene by gene, reach even the extreme bands

    resumed = ComplexityAwareSampler(space, seed=999, num_archs=2, num_bins=6)
    replay = ComplexityAwareSampler(space, seed=1, num_archs=2, num_bins=6)
    replay.sample(29)
    resumed.load_state_dict(replay.state_dict())
    assert resumed.seed == 1 and resumed.state_dict() == replay.state_dict()
    assert [resumed.sample(s) for s in range(20, 30)] == history[20:]  # backwards: replayed from the seed
    with pytest.raises(ValueError, match="name"):
        UniformSampler(space).load_state_dict(replay.state_dict())


def test_complexity_aware_with_steps_per_move_and_restriction():
    space = ElasticViT(1, 8, 10)
    sampler = ComplexityAwareSampler(space, seed=0, num_bins=4, steps_per_move=5)
    levels = [sampler.level_at(s) for s in range(20)]
    assert all(len(set(levels[i : i + 5])) == 1 for i in range(0, 20, 5))
    low, high = sampler.band(0, elastic=["mlp"])
    assert space.flops(space.min_arch(["mlp"])) <= low < high <= space.flops(space.max_arch())
    for arch in sampler.sample(0, elastic=["mlp"]):
        assert low <= space.flops(arch) <= high and arch["depth"] == space.max_arch()["depth"]


def test_build_sampler_from_config(space):
    sandwich = build_sampler({"name": "sandwich", "num_archs": 1, "random": "complexity_aware", "num_bins": 3},
                             space, seed=0)
    assert isinstance(sandwich, SandwichSampler) and isinstance(sandwich.random_sampler, ComplexityAwareSampler)
    assert len(sandwich.sample(0)) == 3
    state = sandwich.state_dict()
    other = build_sampler({"name": "sandwich", "num_archs": 1, "random": "complexity_aware", "num_bins": 3},
                          space, seed=4)
    other.load_state_dict(state)
    assert other.sample(5) == sandwich.sample(5)
    assert isinstance(build_sampler({"name": "uniform"}, space, 0), UniformSampler)
    for cfg, match in [({"name": "random"}, "sampler.name"), ({"name": "uniform", "bins": 3}, "sampler.bins"),
                       ({"name": "sandwich", "random": "sandwich"}, "sampler.random"),
                       ({"name": "complexity_aware", "num_bins": 0}, "num_bins"),
                       ({"name": "uniform", "num_archs": -1}, "num_archs")]:
        with pytest.raises(ValueError, match=match):
            build_sampler(cfg, space, 0)


def test_progressive_shrinking_phases(space):
    phases = [{"until_step": 10, "elastic": ["kernel"]}, {"until_step": 20, "elastic": ["kernel", "depth"]},
              {"until_step": None, "elastic": "all"}]
    dims = space.elastic_dims
    assert elastic_at(phases, 0, dims) == {"kernel"}
    assert elastic_at(phases, 10, dims) == {"kernel", "depth"}
    assert elastic_at(phases, 10**6, dims) == set(dims)
    assert elastic_at(None, 0, dims) == set(dims)
    sampler = UniformSampler(space, seed=0, num_archs=4)
    assert all(a["depth"] == space.max_arch()["depth"] for a in sampler.sample(3, elastic_at(phases, 3, dims)))
    for bad, match in [
        ([{"until_step": 5, "elastic": ["kernel"]}], "last phase"),
        ([{"until_step": None, "elastic": ["kernel"]}, {"until_step": None, "elastic": "all"}], "open-ended"),
        ([{"until_step": 5, "elastic": []}, {"until_step": 5, "elastic": "all"}, {"until_step": None}], "until_step"),
        ([{"until_step": None, "elastic": ["heads"]}], "heads"),
        ([{"until": None, "elastic": "all"}], "until"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_phases(bad, dims)
