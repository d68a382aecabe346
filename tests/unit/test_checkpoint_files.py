"""Checkpoint files in one process (no process group): atomic saves, what is pruned, untrusted bytes.

The faults are real where it matters: a forked writer is killed (``os._exit``)
half-way through DCP's file write or after its data but before the commit, a
malicious ``.metadata`` and a malicious item really try to run a command, and
a YAML alias bomb is really parsed. Multi-process saves, resume and the
world-size fallback are in tests/distributed/test_checkpoint_dcp.py.
"""

import json
import logging
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_supernet.data import ShardSampler
from dist_supernet.train import checkpoint as checkpoint_module
from dist_supernet.train.checkpoint import (
    CheckpointManager,
    ModelState,
    RNGState,
    TorchOptimizerState,
    rank_key,
    read_checkpoint,
)
from dist_supernet.train.config import ConfigError
from dist_supernet.train.untrusted import (
    check_recipe,
    load_dcp_metadata,
    parse_config_text,
    read_json_capped,
)
from tests.fault_report import record


def _training(seed: int):
    """A tiny model, AdamW with state, an LR schedule and a data position: everything a resume needs."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    sampler = ShardSampler(64, num_replicas=1, rank=0, batch_size=4, seed=seed)
    return model, opt, sched, sampler


def _step(model, opt, sched, sampler):
    next(sampler)
    model(torch.randn(4, 6)).pow(2).sum().backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _components(model, opt, sched, sampler, extra=None):
    replicated = {"model": ModelState(model), "optimizer": TorchOptimizerState(opt), "scheduler": sched,
                  "sampler": sampler, "extra": extra if extra is not None else {}}
    return replicated, {"rng": RNGState()}


def _save(ckpts: CheckpointManager, step: int, seed: int = 0, **manifest) -> Path:
    model, opt, sched, sampler = _training(seed + step)
    for _ in range(2):
        _step(model, opt, sched, sampler)
    replicated, per_rank = _components(model, opt, sched, sampler, extra={"arch_sampler": {"name": "x", "seed": 3}})
    return ckpts.save(replicated, per_rank, step=step, manifest=manifest)


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _crash_in_child(fn) -> None:
    """Run ``fn`` in a forked child that must die inside it (exit 9)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns to pytest
        try:
            fn()
        finally:
            os._exit(3)  # fn returned or raised: the crash did not happen where intended
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 9, status


def test_save_then_load_restores_everything_bit_identically(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    model, opt, sched, sampler = _training(0)
    for _ in range(3):
        _step(model, opt, sched, sampler)
    path = ckpts.save(*_components(model, opt, sched, sampler, extra={"arch_sampler": {"walk": [1, 2]}}), step=3,
                      manifest={"config": {"optim": {"name": "adamw"}}})
    draws = torch.rand(4)  # the RNG after the save: restored by the load
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    _step(model, opt, sched, sampler)
    expected_next = {k: v.clone() for k, v in model.state_dict().items()}

    model2, opt2, sched2, sampler2 = _training(1)  # other weights, no optimizer state yet
    extra: dict = {}
    found = ckpts.find_latest()
    assert (found.step, found.world_size, found.path) == (3, 1, path)
    assert found.config == {"optim": {"name": "adamw"}}
    assert found.shapes() == {k: list(v.shape) for k, v in model2.state_dict().items()}
    replicated, per_rank = _components(model2, opt2, sched2, sampler2, extra)
    ckpts.load(found, {**replicated, rank_key(0): checkpoint_module.StatefulGroup(per_rank)})
    assert all(torch.equal(expected[k], v) for k, v in model2.state_dict().items())
    assert torch.equal(torch.rand(4), draws)
    assert extra == {"arch_sampler": {"walk": [1, 2]}}
    _step(model2, opt2, sched2, sampler2)  # the same next step: AdamW moments, lr and batch position restored
    assert all(torch.equal(expected_next[k], v) for k, v in model2.state_dict().items())
    assert (sched2.last_epoch, sampler2.state_dict()) == (sched.last_epoch, sampler.state_dict())

    manifest = json.loads((path / "manifest.json").read_text())
    assert (manifest["step"], manifest["world_size"], manifest["format"]) == (3, 1, checkpoint_module.FORMAT)
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp"}
    assert all(checkpoint_module.sha256_file(path / n) == f["sha256"] for n, f in manifest["files"].items())
    state = read_checkpoint(path)
    assert torch.equal(state["model"]["0.weight"], expected["0.weight"]) and "rank00000" in state


def test_writer_killed_inside_dcp_leaves_the_previous_checkpoint_and_its_temporary_is_pruned(tmp_path, caplog):
    ckpts = CheckpointManager(tmp_path, keep=3)
    _save(ckpts, 2)

    def die_half_way():
        import torch.distributed.checkpoint.filesystem as fs

        def write_part_then_die(transforms, stream, data, write_item, storage_key, serialization_format):
            stream.write(b"\0" * 100)
            stream.flush()
            os._exit(9)  # the process dies with part of a file written

        fs._write_item = write_part_then_die  # DCP's per-item writer (torch 2.13)
        _save(ckpts, 4)

    _crash_in_child(die_half_way)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".step_00000004.tmp-")]
    assert leftovers == [f".step_00000004.tmp-{ckpts.writer}"] and not (tmp_path / "step_00000004").exists()
    started = time.monotonic()
    found = ckpts.find_latest()
    record("writer killed inside DCP's write", detected_s=round(time.monotonic() - started, 4), note="at the next load")
    assert found.step == 2
    (line,) = _warnings(caplog)
    assert line.startswith(f"checkpoint step_00000004 is unusable: {leftovers[0]} is an incomplete write (this "
                           "job's; the writer stopped before its manifest)")
    # Another job's temporary is not ours: reported, never pruned.
    other = tmp_path / ".step_00000005.tmp-otherhost-1234"
    other.mkdir()
    _save(ckpts, 6)  # the next complete save prunes our leftover only
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "step_00000002", "step_00000006"]


def test_writer_killed_after_its_data_before_the_commit(tmp_path, caplog):
    ckpts = CheckpointManager(tmp_path, keep=3)
    _save(ckpts, 2)

    def die_before_commit():
        def die(*args, **kwargs):
            os._exit(9)

        ckpts._commit = die  # every file written and synced; no manifest, no rename
        _save(ckpts, 4)

    _crash_in_child(die_before_commit)
    temporary = tmp_path / f".step_00000004.tmp-{ckpts.writer}"
    assert (temporary / ".metadata").is_file() and not (temporary / "manifest.json").exists()
    started = time.monotonic()
    assert ckpts.find_latest().step == 2
    record("writer killed before the commit", detected_s=round(time.monotonic() - started, 4))
    (line,) = _warnings(caplog)
    assert "step_00000004 is unusable: " in line and "incomplete write" in line


def test_a_corrupt_newest_checkpoint_is_caught_by_its_hash_and_kept(tmp_path, caplog):
    ckpts = CheckpointManager(tmp_path, keep=3)
    for step in (2, 4):
        _save(ckpts, step)
    data_file = tmp_path / "step_00000004" / "__0_0.distcp"
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the middle, same size
    data_file.write_bytes(bytes(data))
    started = time.monotonic()
    assert ckpts.find_latest().step == 2
    record("corrupt newest checkpoint", detected_s=round(time.monotonic() - started, 4))
    (line,) = _warnings(caplog)
    assert line.startswith("checkpoint step_00000004 is unusable: sha256 mismatch in __0_0.distcp") and "\n" not in line
    assert data_file.is_file()  # never deleted
    with pytest.raises(ConfigError, match=r"^trainer\.resume=.*: step_00000004 is unusable: sha256 mismatch in "
                                          r"__0_0\.distcp \(\d+ of \d+ bytes, truncated or corrupt\)$"):
        ckpts.open(tmp_path / "step_00000004", "trainer.resume", str(tmp_path / "step_00000004"))


def test_a_checkpoint_without_manifest_is_verified_by_reading_it_used_or_set_aside(tmp_path, caplog):
    """Issue 13: a complete checkpoint whose manifest did not travel with it is never pruned."""
    ckpts = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4, 6):
        _save(ckpts, step)
    (tmp_path / "step_00000006" / "manifest.json").unlink()  # e.g. copied without it
    found = ckpts.find_latest()
    assert (found.step, found.world_size, found.manifest) == (6, 1, None)
    (line,) = _warnings(caplog)
    assert line.startswith("checkpoint step_00000006 has no manifest.json: every item was read back")
    caplog.clear()
    with open(tmp_path / "step_00000006" / "__0_0.distcp", "r+b") as f:  # now also truncated
        f.truncate(500)
    assert ckpts.find_latest().step == 4
    lines = _warnings(caplog)
    assert lines[0].startswith("checkpoint step_00000006 is unusable: __0_0.distcp is truncated")
    assert lines[1] == "checkpoint step_00000006 set aside as step_00000006.unusable-no-manifest (not deleted)"
    _save(ckpts, 8)
    _save(ckpts, 10)  # retention (keep=2) prunes complete checkpoints only
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000006.unusable-no-manifest", "step_00000008", "step_00000010"]


def test_a_single_file_checkpoint_of_the_older_format_is_refused_in_one_line_and_kept(tmp_path):
    ckpts = CheckpointManager(tmp_path, keep=2)
    _save(ckpts, 2)
    legacy = tmp_path / "step_00000009.pt"
    torch.save({"step": 9, "model": {}}, legacy)
    with pytest.raises(ConfigError) as info:
        ckpts.find_latest("trainer.resume", "auto")
    assert str(info.value).startswith("trainer.resume=auto: step_00000009.pt is a single-file checkpoint of an "
                                      "older dist_supernet") and "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="single-file checkpoint"):
        ckpts.open(legacy, "trainer.resume", str(legacy))
    _save(ckpts, 12)  # a newer one of ours: the old file is older work, ignored, and never pruned
    assert ckpts.find_latest().step == 12 and legacy.is_file()


def test_nothing_read_from_a_checkpoint_runs_code(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    # 1. DCP's index: DCP itself would pickle.load it. The manifest's digests match (whoever
    #    crafts the files crafts the manifest too), so only the restricted unpickler stands between.
    ckpts = CheckpointManager(tmp_path / "a", keep=2)
    path = _save(ckpts, 2)
    (path / ".metadata").write_bytes(pickle.dumps(Evil()))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][".metadata"] = {"sha256": checkpoint_module.sha256_file(path / ".metadata"),
                                      "num_bytes": (path / ".metadata").stat().st_size}
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as info:
        ckpts.open(path, "trainer.resume", str(path))
    assert "refused: it references posix.system, which a DCP index never holds" in str(info.value)
    assert "\n" not in str(info.value) and not marker.exists()

    # 2. An item: DCP's default planner would torch.load it with weights_only=False.
    ckpts = CheckpointManager(tmp_path / "b", keep=2)
    model, opt, sched, sampler = _training(0)
    _step(model, opt, sched, sampler)
    ckpts.save(*_components(model, opt, sched, sampler, extra={"evil": Evil()}), step=2)
    found = ckpts.find_latest()
    with pytest.raises(ConfigError) as info:
        ckpts.load(found, {"extra": {}})
    assert "could not be loaded" in str(info.value) and "system" in str(info.value), str(info.value)
    assert "\n" not in str(info.value) and not marker.exists()
    record("malicious .metadata and item in a checkpoint", refused=True, code_ran=False)

    # 3. An index whose storage entries point outside the checkpoint directory.
    metadata = load_dcp_metadata(found.path / ".metadata")
    entry = next(iter(metadata.storage_data.values()))
    entry.relative_path = "../../etc/passwd"
    (found.path / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match=r"points outside the checkpoint \('\.\./\.\./etc/passwd'\)"):
        load_dcp_metadata(found.path / ".metadata")


def test_text_from_a_checkpoint_is_parsed_with_a_bound(tmp_path):
    """Issue 13: a few hundred crafted bytes of YAML aliases must not stall start-up."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(9))
    assert len(bomb) < 600
    started = time.monotonic()
    with pytest.raises(ValueError, match=r"^YAML alias \*a at line 2: aliases are refused"):
        parse_config_text(bomb)
    assert time.monotonic() - started < 1
    assert parse_config_text("model: {name: mlp}\noptim: {lr: 0.1}\n") == {"model": {"name": "mlp"}, "optim": {"lr": 0.1}}
    with pytest.raises(ValueError, match="more than 1048576"):
        parse_config_text("x: " + "y" * (1 << 20))
    big = tmp_path / "manifest.json"
    big.write_text(json.dumps({"pad": "x" * 100}))
    with pytest.raises(ValueError, match=r"^manifest\.json is \d+ bytes, more than the 50 this file may have$"):
        read_json_capped(big, 50)
    big.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"^manifest\.json is nested too deeply$"):
        read_json_capped(big)


def test_the_recipe_check_names_the_first_differing_key_and_both_values():
    saved = {"optim": {"name": "birder", "lr": 0.001}, "compression": {"name": "birder", "collective": "two_phase",
             "timeout_s": None}, "supernet": {"sampler": {"name": "sandwich"}, "search": {"population_size": 16}}}
    same = json.loads(json.dumps(saved))
    same["compression"]["timeout_s"] = 30  # no state depends on it
    same["supernet"]["search"]["population_size"] = 4  # after training only
    check_recipe("trainer.resume", "auto", "step_00000040", saved, same)
    check_recipe("trainer.resume", "auto", "step_00000040", {}, same)  # unknown recipe (no manifest): nothing to check
    for group, field, value, shown in [("compression", "name", "fp16", "birder in the checkpoint, fp16 in this run"),
                                       ("compression", "collective", "allgather",
                                        "two_phase in the checkpoint, allgather in this run"),
                                       ("optim", "name", "adamw", "birder in the checkpoint, adamw in this run"),
                                       ("optim", "lr", 0.01, "0.001 in the checkpoint, 0.01 in this run")]:
        other = json.loads(json.dumps(saved))
        other[group][field] = value
        with pytest.raises(ConfigError) as info:
            check_recipe("trainer.resume", "auto", "step_00000040", saved, other)
        assert str(info.value) == (f"trainer.resume=auto: step_00000040 was written with another recipe: first "
                                   f"differing key {group}.{field} ({shown}); trainer.resume_weights_only=true "
                                   "loads only its model weights")


def test_a_save_at_a_step_that_has_a_checkpoint_sets_the_old_one_aside(tmp_path, caplog):
    """Resumed from an earlier step of the same directory: the later checkpoint is kept, not overwritten."""
    ckpts = CheckpointManager(tmp_path, keep=3)
    first = _save(ckpts, 4, seed=1)
    digest = json.loads((first / "manifest.json").read_text())["files"]["__0_0.distcp"]["sha256"]
    _save(ckpts, 4, seed=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names[0] == "step_00000004" and names[1].startswith("step_00000004.replaced-") and len(names) == 2
    assert json.loads((tmp_path / names[1] / "manifest.json").read_text())["files"]["__0_0.distcp"]["sha256"] == digest
    (line,) = _warnings(caplog)
    assert line == f"checkpoint step_00000004 already exists: set aside as {names[1]}"


# -- issue 22: whose checkpoints are pruned, a full disk, the manifest against the index, partial loads ------


def _relabel(path: Path, run: str) -> None:
    """Make a checkpoint another run's: its manifest's writer and lineage (the manifest is not hashed)."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["writer"] = manifest["run"] = run
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_only_this_runs_checkpoints_are_pruned_and_a_fresh_run_beside_another_runs_is_refused(tmp_path, caplog):
    """Retention counts this run's own checkpoints (its lineage); another run's are never pruned."""
    ckpts = CheckpointManager(tmp_path, keep=2)
    for step in (2, 4):
        _save(ckpts, step)
    _relabel(tmp_path / "step_00000002", "otherhost-1234")  # step 2 is another run's, step 4 ours
    for step in (6, 8, 10):
        _save(ckpts, step)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000008", "step_00000010"]
    # A new job (another writer) that does not resume from here: one line, nothing touched.
    fresh = CheckpointManager(tmp_path, keep=2)
    assert fresh.writer != ckpts.writer
    with pytest.raises(ConfigError) as info:
        fresh.claim(None, "trainer.resume", "never")
    assert str(info.value).startswith(f"trainer.resume=never: {tmp_path} holds 3 checkpoints of 2 other runs (newest "
                                      f"step_00000010, run {ckpts.writer})") and "\n" not in str(info.value)
    # A new job that resumes the newest continues that run: its lineage is adopted and pruned as before;
    # the other run's step 2 is left alone, with one warning line.
    found = fresh.find_latest()
    fresh.claim(found)
    assert fresh.run == ckpts.writer
    assert any("also holds 1 checkpoint of another run (newest step_00000002, run otherhost-1234): left alone, "
               "never pruned" in line for line in _warnings(caplog))
    _save(fresh, 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000010", "step_00000012"]
    manifest = json.loads((tmp_path / "step_00000012" / "manifest.json").read_text())
    assert (manifest["writer"], manifest["run"]) == (fresh.writer, ckpts.writer)


def test_a_full_disk_is_one_line_naming_enospc_and_the_temporary_is_removed(tmp_path):
    """ENOSPC injected at DCP's write layer (torch 2.13 ``_write_item``); a real full tmpfs: test_faults."""
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    ckpts = CheckpointManager(tmp_path, keep=3)
    _save(ckpts, 2)
    size = sum(p.stat().st_size for p in (tmp_path / "step_00000002").iterdir())
    real = fs._write_item

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    fs._write_item = full
    try:
        with pytest.raises(checkpoint_module.CheckpointWriteError) as info:
            _save(ckpts, 4)
    finally:
        fs._write_item = real
    line = str(info.value)
    assert line.startswith(f"checkpoint step_00000004 could not be written: ENOSPC (no space left on device) in "
                           f"{tmp_path}: the last checkpoint took ") and "\n" not in line, line
    assert checkpoint_module._size(size) in line and "the older checkpoints are intact (step_00000002)" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002"]  # our temporary is gone
    assert ckpts.find_latest().step == 2  # and the older checkpoint still verifies


@pytest.mark.parametrize("tamper, problem", [
    (lambda m: m.update(world_size=4), "manifest.json says world_size 4, its index holds the own state of ranks 0..0 (1)"),
    (lambda m: m.update(step=40), "manifest.json says step 40, the directory is step_00000004"),
    (lambda m: m["files"].pop("__0_0.distcp"), "its index references __0_0.distcp, which manifest.json does not list"),
    (lambda m: m.update(config={"optim": {"name": "birder"}}), "manifest.json says optim=birder, its index holds adamw"),
])
def test_manifest_fields_are_checked_against_the_checkpoints_own_index(tmp_path, tamper, problem):
    ckpts = CheckpointManager(tmp_path, keep=3)
    path = _save(ckpts, 4)
    manifest = json.loads((path / "manifest.json").read_text())
    tamper(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError) as info:
        ckpts.open(path, "trainer.resume", "x")
    assert str(info.value).startswith(f"trainer.resume=x: step_00000004 is unusable: {problem}"), str(info.value)


def test_a_load_reads_only_what_is_present_and_decides_every_absent_item_in_one_line(tmp_path, caplog):
    """No silent partial load: an optional component starts fresh (said), a missing setting keeps this run's
    value (said), a missing required component or tensor refuses the checkpoint."""
    ckpts = CheckpointManager(tmp_path, keep=5)
    model, opt, sched, sampler = _training(0)
    _step(model, opt, sched, sampler)
    replicated, per_rank = _components(model, opt, sched, sampler)
    del replicated["sampler"]  # an older writer: no data position
    ckpts.save(replicated, per_rank, step=2)
    found = ckpts.find_latest()
    model2, opt2, sched2, sampler2 = _training(1)
    replicated2, per_rank2 = _components(model2, opt2, sched2, sampler2)
    with pytest.raises(ConfigError, match=r"^trainer\.resume=auto: step_00000002 lacks sampler entirely: it cannot "
                                          r"be resumed"):
        ckpts.load(found, replicated2)
    # Without the sampler, and asking for non-finite counters the checkpoint never had and a param-group option
    # a newer torch would add: loaded, and one line says what started fresh and what kept this run's value.
    del replicated2["sampler"]
    guard = {"skipped_steps": 0, "consecutive_skips": 0}
    replicated2["nonfinite"] = guard
    opt2.param_groups[0]["future_option"] = 7
    caplog.clear()
    ckpts.load(found, replicated2)
    (line,) = _warnings(caplog)
    assert line == ("checkpoint step_00000002: nonfinite is absent: the non-finite step counters start at 0; "
                    "optimizer.param_groups.0.future_option absent: this run's value is kept"), line
    assert opt2.param_groups[0]["future_option"] == 7 and torch.equal(model2[0].weight, model[0].weight)
    # A tensor the checkpoint lacks (a model grown by one layer's bias, say) is refused, naming it.
    bigger = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 3))
    with pytest.raises(ConfigError, match=r"step_00000002 lacks model\.3\.weight \(a tensor, shape \[3, 3\]\)"):
        ckpts.load(found, {"model": ModelState(bigger)})
