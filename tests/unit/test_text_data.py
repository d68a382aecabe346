"""data=text without processes: the embedded corpus, its splits and cache, a user's file, batches, evaluation windows."""

import hashlib
import json
import logging
from types import SimpleNamespace

import pytest
import torch

from dist_supernet.data import TextBatches, load_data, load_text
from dist_supernet.data import text as text_module
from dist_supernet.errors import ConfigError
from dist_supernet.train.config import validate
from dist_supernet.train.preflight import check_config
from tests.configs import compose_train

GPT = ["model=gpt", "data=text", "model.n_layer=1", "model.n_head=2", "model.n_embd=16"]


def _model(block_size: int):
    return SimpleNamespace(block_size=block_size)  # what the data reads of a language model


@pytest.fixture(scope="module")
def corpus():
    """The real embedded corpus, from the machine's cache (built here once: ~5-10 s on 2 busy cores)."""
    return load_text()


def test_embedded_corpus_is_python_prose_split_by_document_reproducibly(corpus):
    assert corpus.source.startswith("python-docs: pydoc_data.topics and the docstrings of the standard library")
    total = len(corpus.train) + len(corpus.val) + len(corpus.test)
    assert 1_500_000 < total < 5_000_000 and 60 < corpus.vocab_size < 400  # a few MB of characters
    assert corpus.train.dtype == torch.uint8 and corpus.vocab == "".join(sorted(corpus.vocab))
    # The fractions hold to within one document; nothing of the text is lost or shared between splits.
    assert abs(len(corpus.val) / total - 0.05) < 0.01 and abs(len(corpus.test) / total - 0.05) < 0.01
    docs, _, _ = text_module._cached_embedded_corpus(None)  # as built (the cache is checked below)
    assert docs[0].startswith('The "assert" statement')  # pydoc topics first, in key order
    assert len(docs) == len(set(docs)) > 5000
    assert all("idlelib" not in str(p) and "/test/" not in str(p) for p in
               text_module._stdlib_sources(text_module.Path(text_module.sysconfig.get_paths()["stdlib"])))
    val_text, test_text = corpus.decode(corpus.val), corpus.decode(corpus.test)
    joined = "\n\n".join(docs)
    assert total == len(joined) - 2 * 2  # the three splits hold every document; two fewer separators
    # documents are whole in one split: the start of val (400 characters: unique) is in neither other split
    assert val_text[:400] not in test_text and val_text[:400] not in corpus.decode(corpus.train)
    assert val_text[:400] in joined
    again = load_text()
    assert again.sha256 == corpus.sha256 == hashlib.sha256(joined.encode()).hexdigest()
    assert torch.equal(again.val, corpus.val) and torch.equal(again.train, corpus.train)
    other = load_text(split_seed=1)
    assert not torch.equal(other.val[:1000], corpus.val[:1000]) and other.sha256 == corpus.sha256


def test_cache_is_verified_by_checksum_and_rebuilt_when_damaged(tmp_path, monkeypatch, caplog):
    docs = ["alpha beta gamma\n" * 40, "delta epsilon\n" * 40, "zeta eta theta\n" * 40, "iota kappa\n" * 40]
    builds = []
    monkeypatch.setattr(text_module, "embedded_corpus_documents", lambda: (builds.append(1) or list(docs), "fake"))
    first = load_text(cache_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25)
    (folder,) = (tmp_path / "text").iterdir()
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["sha256"] == first.sha256 == hashlib.sha256((folder / "corpus.txt").read_bytes()).hexdigest()
    assert meta["doc_lengths"] == [len(d) for d in docs] and len(builds) == 1
    assert torch.equal(load_text(cache_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25).train, first.train)
    assert len(builds) == 1  # the second load read the cache
    corpus_file = folder / "corpus.txt"
    corpus_file.write_bytes(corpus_file.read_bytes().replace(b"beta", b"BETA"))  # same length, other bytes
    with caplog.at_level(logging.WARNING):
        rebuilt = load_text(cache_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25)
    assert len(builds) == 2 and "checksum or layout does not match" in caplog.text
    assert rebuilt.sha256 == first.sha256 and b"BETA" not in corpus_file.read_bytes()
    (folder / "meta.json").write_text("{not json")
    load_text(cache_dir=str(tmp_path), val_fraction=0.25, test_fraction=0.25)
    assert len(builds) == 3


def test_a_users_file_is_split_in_documents_and_bad_files_are_one_line(tmp_path):
    lines = [f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(4000)]
    good = tmp_path / "mine.txt"
    good.write_text("".join(lines))
    ds = load_text(str(good), val_fraction=0.1, test_fraction=0.1)
    assert ds.source == str(good) and ds.sha256 == hashlib.sha256(good.read_bytes()).hexdigest()
    assert set(ds.vocab) == set("".join(lines))
    # ~4 KB documents at line ends: every split is whole lines
    for split in (ds.train, ds.val, ds.test):
        assert all(line.startswith("line ") for line in ds.decode(split).split("\n") if line)
    cases = {
        "missing": (None, "file not found"),
        "empty": (b"  \n\n", "is empty"),
        "binary": (b"PK\x03\x04\x00\x00binary", "is binary (a NUL byte at offset 4)"),
        "latin1": ("caf\xe9 au lait\n".encode("latin-1") * 10, "is not UTF-8 text (byte 3"),
    }
    for name, (content, reason) in cases.items():
        path = tmp_path / f"{name}.txt"
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ConfigError) as error:
            load_text(str(path))
        assert str(error.value).startswith(f"data.path={path}: {reason}"), str(error.value)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="is not a regular file"):
        load_text(str(tmp_path))
    unreadable = tmp_path / "locked.txt"
    unreadable.write_text("text\n")
    original = text_module.Path.read_bytes

    def refuse(self):  # root reads a chmod 000 file anyway, so the OS error is simulated
        if self == unreadable:
            raise PermissionError(13, "Permission denied")
        return original(self)

    text_module.Path.read_bytes = refuse
    try:
        with pytest.raises(ConfigError, match=r"^data\.path=.*locked\.txt: cannot be read \(Permission denied\)$"):
            load_text(str(unreadable))
    finally:
        text_module.Path.read_bytes = original
    with pytest.raises(ConfigError, match=r"^data\.val_fraction=0\.6: with data\.test_fraction=0\.5 leaves no text"):
        load_text(str(good), val_fraction=0.6, test_fraction=0.5)


def test_the_config_check_refuses_bad_text_inputs_in_one_line(tmp_path):
    """The app's one validation pass (model.* values: tests/unit/test_gpt.py)."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        ([f"data.path={tmp_path / 'nope.txt'}"], f"data.path={tmp_path / 'nope.txt'}: file not found"),
        ([f"data.path={empty}"], f"data.path={empty}: is empty"),
        (["data.eval_windows=0"], "data.eval_windows=0: must be >= 1"),
        (["trainer.batch_size=100000"], "trainer.batch_size=100000: larger than each rank's shard"),
        (["data=digits"], "model.name=gpt: trains on text data; data=digits is image data (data=text)"),
    ]
    for overrides, message in [*((GPT + o, m) for o, m in cases),
                               (["model=mlp", "data=text"], "model.name=mlp: trains on image data; data=text is "
                                                            "text data (data=digits, mnist5k or npz)")]:
        with pytest.raises(ConfigError) as error:
            check_config(compose_train(*overrides), tmp_path / "run", world_size=2)
        assert str(error.value).startswith(message), (overrides, str(error.value))
    checked = check_config(compose_train(*GPT), tmp_path / "run", world_size=2)
    assert checked.data.kind == "text" and checked.model.config.vocab_size == checked.data.vocab_size
    assert validate(compose_train(*GPT)).data.eval_windows == 128


def test_windows_are_rank_disjoint_reproducible_resumable_and_reshuffled():
    tokens = torch.arange(10_000) % 251  # a distinct window start is visible in x[:, 0] via the position
    positions = torch.arange(10_000)

    def epoch_starts(rank, seed=0, world=2):
        b = TextBatches(positions, 16, num_replicas=world, rank=rank, batch_size=8, seed=seed)
        batches = [next(b) for _ in range(b.sampler.num_batches_per_epoch)]
        assert all(torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x + 1, y) for x, y in batches)
        return torch.cat([x[:, 0] for x, _ in batches]), b

    starts0, b0 = epoch_starts(0)
    starts1, _ = epoch_starts(1)
    assert not set(starts0.tolist()) & set(starts1.tolist())  # no window on two ranks
    both = torch.cat([starts0, starts1]).sort().values
    assert (both.diff() % 16 == 0).all() and (both.diff() > 0).all()  # non-overlapping, one offset per epoch
    assert torch.equal(epoch_starts(0)[0], starts0)  # the same seed, the same order
    assert not torch.equal(epoch_starts(0, seed=1)[0], starts0)
    # the next epoch: another offset and order; position restored from a mid-epoch state_dict
    b = TextBatches(positions, 16, num_replicas=2, rank=0, batch_size=8, seed=0)
    epochs = [torch.cat([next(b)[0][:, 0] for _ in range(b.sampler.num_batches_per_epoch)]) for _ in range(2)]
    assert b.offset(0) != b.offset(1)  # (seed 0 draws 2 different offsets: the check below can fail)
    assert [set((e % 16).tolist()) for e in epochs] == [{b.offset(0)}, {b.offset(1)}]
    assert set(epochs[0].tolist()) != set(epochs[1].tolist())
    b = TextBatches(positions, 16, num_replicas=2, rank=0, batch_size=8, seed=0)
    for _ in range(b.sampler.num_batches_per_epoch + 3):
        next(b)
    state = b.state_dict()
    expected = [next(b)[0] for _ in range(4)]
    fresh = TextBatches(positions, 16, num_replicas=2, rank=0, batch_size=8, seed=0)
    fresh.load_state_dict(state)
    assert all(torch.equal(next(fresh)[0], e) for e in expected) and fresh.epoch == 1
    x, y = next(TextBatches(tokens, 16, num_replicas=1, rank=0, batch_size=2, seed=0))
    assert x.dtype == y.dtype == torch.long


def test_eval_windows_are_fixed_and_shared_out_without_overlap(corpus):
    model = _model(64)
    starts = corpus.eval_windows_of("val", 64)
    assert len(starts) == 128 and (starts.diff() >= 64).all() and starts[-1] + 65 <= len(corpus.val)
    alone = torch.cat([x for x, _ in corpus.eval_batches("val", rank=0, world_size=1, batch_size=16, model=model)])
    shares = [torch.cat([x for x, _ in corpus.eval_batches("val", rank=r, world_size=3, batch_size=5, model=model)])
              for r in range(3)]
    assert len(alone) == 128 and sum(len(s) for s in shares) == 128
    as_rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
    assert as_rows(torch.cat(shares)) == as_rows(alone)  # the same set whatever the world size
    small = load_data(SimpleNamespace(name="text", path=None, val_fraction=0.05, test_fraction=0.05, split_seed=0,
                                      eval_windows=7, cache_dir=None))
    assert len(small.eval_windows_of("val", 64)) == 7
    with pytest.raises(ConfigError, match=r"^data\.val_fraction=null: leaves \d+ tokens in the val split"):
        corpus.check_eval(_model(len(corpus.val)))
    assert corpus.eval_metrics(2.0, 0.5) == {"loss": 2.0, "perplexity": pytest.approx(7.389056)}
