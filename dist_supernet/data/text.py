"""Character-level text for language models: Python's own documentation, built at run time, or your file.

``data=text`` with ``data.path=null`` builds the **embedded corpus** from text that
ships with every CPython install, no download: the language reference topics
of ``pydoc_data/topics.py`` (what ``help("assert")`` prints; ~0.5 MB of English
prose with code) and the docstrings of the standard library's modules, classes
and functions, read with ``ast`` from the ``.py`` sources (nothing is
imported; tests, IDLE, tkinter, turtledemo, lib2to3, ensurepip and the codec
boilerplate of ``encodings`` left out; exact duplicates dropped): ~2 MB on
Python 3.11 in ~6,900 documents over ~110 distinct characters. Why these:
they are prose (a language model's usual diet, unlike the sources'
code), they are on every machine that runs this project, and they are big
enough that a ~1M-parameter model trained for a few thousand steps does not
see a token twice. They differ between Python versions: the cache key holds the
version, and ``summary.json`` records the corpus's sha256.

``data.path=/your/file.txt``: any UTF-8 text file (one ``ConfigError`` naming
``data.path`` for a missing, unreadable, empty, binary or non-UTF-8 file); it is
cut into documents of ~``DOC_CHARS`` characters at line ends.

Splits: the documents are assigned to val, test and train by a permutation
from ``split_seed`` (val first until it holds ``val_fraction`` of the
characters, then test, then the rest to train); each split is its documents
concatenated in corpus order, joined by a blank line. The vocabulary is every
character of the corpus, sorted; a token is its index (``uint8`` when it fits).

Cache: ``<cache_dir>/text/<key>/corpus.txt`` and ``meta.json`` (the documents'
lengths, the sha256 of ``corpus.txt``); written atomically (several ranks may
build at once: the same bytes, renamed into place), verified on every load and
rebuilt with a warning when the checksum does not match.

Batches (:class:`TextBatches`): a training sample is a window of ``T + 1``
tokens (``T`` = the model's ``block_size``): ``x`` its first ``T``, ``y`` its
last ``T``. Each epoch the train split is cut into non-overlapping windows at
an offset drawn from ``(seed, epoch)``, and the windows are dealt to the ranks
by :class:`~dist_supernet.data.sampler.ShardSampler` (a permutation from
``(seed, epoch)``, interleaved shards): no two ranks see the same window in an
epoch, the order is the same in every run with the same seed, and a checkpoint
resumes at the exact next batch. Evaluation (:meth:`TextDataset.eval_batches`)
scores ``eval_windows`` fixed, evenly spaced, non-overlapping windows of the
split, the same whatever the step, world size or seed; each rank scores an
interleaved share and the sums are all-reduced, so every rank reports the same
loss.

Example::
    >>> ds = load_text(cache_dir=tmp_dir)
    >>> ds.vocab_size, len(ds.train) > 1_000_000, ds.sha256[:8]
    (108, True, '…')
    >>> batches = ds.train_batches(rank=0, world_size=2, batch_size=4, seed=0, model=gpt)
    >>> x, y = next(batches); x.shape, torch.equal(x[:, 1:], y[:, :-1])
    (torch.Size([4, 128]), True)
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from dist_supernet.data.sampler import ShardSampler
from dist_supernet.errors import ConfigError

log = logging.getLogger(__name__)

EMBEDDED = "python-docs"  # the corpus's name in summaries and the cache
BUILDER_VERSION = 1  # why: bump when what goes into the embedded corpus changes, so old caches are not reused
DOC_CHARS = 4096  # why: a user's file in ~4 KB documents: thousands of them for a few MB, so splits mix the file
MAX_VOCAB = 65_536  # why: a character-level vocabulary beyond this is not text (the embedding would take GBs)
# Standard-library folders whose docstrings are not prose about Python: tests, GUI demos, vendored tools,
# and ``encodings``' ~120 copies of "Python Character Mapping Codec ... generated from ...".
_SKIP_DIRS = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "site-packages",
              "dist-packages", "__pycache__", "encodings"}


@dataclasses.dataclass
class TextDataset:
    """A character-level corpus in three splits of token ids, and how to batch and score them.

    ``vocab[i]`` is token ``i``; ``train``/``val``/``test`` are 1-D tensors of token
    ids (``uint8`` for a vocabulary of at most 256 characters, else ``int32``).
    """

    name: str
    source: str  # what the text is: "python-docs (Python 3.11.7 ...)" or the file's path
    vocab: str
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    sha256: str  # of the corpus text the splits were cut from
    eval_windows: int = 128
    kind = "text"  # what a model family registers to train on (dist_supernet.models.TEXT)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def has_test(self) -> bool:
        return len(self.test) > 0

    def model_inputs(self) -> dict:
        """The builder arguments of a text model family (``build_model(cfg, **data.model_inputs())``)."""
        return {"vocab_size": self.vocab_size}

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` (every character must be in the vocabulary)."""
        index = {c: i for i, c in enumerate(self.vocab)}
        return torch.tensor([index[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        """The text of token ids (a tensor or a list)."""
        ids = torch.as_tensor(ids, dtype=torch.long).numpy()
        return _code_points(self.vocab)[ids].tobytes().decode("utf-32-le")

    def info(self) -> dict:
        """What ``summary.json`` records about the data."""
        return {"data_source": self.source, "data_sha256": self.sha256, "vocab_size": self.vocab_size,
                "split_tokens": {"train": len(self.train), "val": len(self.val), "test": len(self.test)}}

    def eval_metrics(self, loss: float, accuracy: float) -> dict:
        """What evaluation reports: the mean loss per token (nats) and its perplexity."""
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}  # exp overflows a float past ~709

    def train_batches(self, *, rank: int, world_size: int, batch_size: int, seed: int, model) -> TextBatches:
        """This rank's batches of ``(x, y)`` windows of the train split; ``model.block_size`` tokens each.

        ConfigError (``trainer.batch_size=...``) when an epoch has fewer windows per rank than one batch.
        """
        seq_len = _block_size(model)
        num_windows = _num_train_windows(len(self.train), seq_len)
        shard = num_windows // world_size
        if not 1 <= batch_size <= shard:
            raise ConfigError("trainer.batch_size", batch_size,
                              f"larger than each rank's shard ({shard} windows of {seq_len + 1} tokens of the "
                              f"{len(self.train)}-token train split on {world_size} ranks)")
        return TextBatches(self.train, seq_len, num_replicas=world_size, rank=rank, batch_size=batch_size, seed=seed)

    def eval_windows_of(self, split: str, seq_len: int) -> torch.Tensor:
        """Start positions of the fixed evaluation windows of ``split`` (at most ``eval_windows``, evenly spread)."""
        tokens = self._split(split)
        available = (len(tokens) - 1) // seq_len  # non-overlapping windows of seq_len + 1 tokens
        count = min(self.eval_windows, available)
        if count == 0:
            return torch.zeros(0, dtype=torch.long)
        index = torch.linspace(0, available - 1, count).round().long().unique()
        return index * seq_len

    def eval_batches(self, split: str, *, rank: int, world_size: int, batch_size: int,
                     model) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share (windows ``rank::world_size``) of the split's fixed evaluation windows, in batches."""
        seq_len = _block_size(model)
        tokens = self._split(split)
        starts = self.eval_windows_of(split, seq_len)[rank::world_size]
        for chunk in starts.split(max(1, batch_size)):
            yield _windows(tokens, chunk, seq_len)

    def check_eval(self, model) -> None:
        """ConfigError when the val (or a non-empty test) split holds no whole window of the model's length."""
        seq_len = _block_size(model)
        for split, key in (("val", "data.val_fraction"), ("test", "data.test_fraction")):
            tokens = self._split(split)
            if (split == "val" or len(tokens)) and len(tokens) < seq_len + 1:
                raise ConfigError(key, None, f"leaves {len(tokens)} tokens in the {split} split, fewer than one "
                                             f"window of model.block_size + 1 = {seq_len + 1}")

    def _split(self, split: str) -> torch.Tensor:
        if split not in ("train", "val", "test"):
            raise ValueError(f"split={split!r}: expected train, val or test")
        return getattr(self, split)


def _block_size(model) -> int:
    seq_len = getattr(model, "block_size", None)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError("model.name", type(model).__name__, "data=text needs a language model with a block_size "
                                                              "(its context length), e.g. model=gpt")
    return seq_len


def _num_train_windows(num_tokens: int, seq_len: int) -> int:
    """Windows of seq_len + 1 tokens that fit at every offset in [0, seq_len): the same count each epoch."""
    return max(0, (num_tokens - seq_len) // seq_len)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``, ``y`` (int64, [len(starts), seq_len]) of the windows of ``seq_len + 1`` tokens at ``starts``."""
    rows = tokens[starts[:, None] + torch.arange(seq_len + 1)].long()
    return rows[:, :-1], rows[:, 1:]


class TextBatches:
    """``next()`` -> ``(x, y)``: int64 ``[batch_size, seq_len]`` windows of ``tokens`` for rank ``rank``.

    Epoch ``e`` cuts the tokens into non-overlapping windows starting at an offset
    in ``[0, seq_len)`` drawn from ``(seed, e)``; a :class:`ShardSampler` deals the
    windows to the ranks (disjoint, reshuffled each epoch) and holds the position,
    so ``state_dict``/``load_state_dict`` resume at the exact next batch.

    Example::
        >>> b = TextBatches(torch.arange(100), 8, num_replicas=2, rank=0, batch_size=3, seed=0)
        >>> x, y = next(b); x.shape, torch.equal(x + 1, y)
        (torch.Size([3, 8]), True)
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int, *, num_replicas: int, rank: int, batch_size: int,
                 seed: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.sampler = ShardSampler(_num_train_windows(len(tokens), seq_len), num_replicas=num_replicas, rank=rank,
                                    batch_size=batch_size, seed=seed)

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def offset(self, epoch: int) -> int:
        """Where epoch ``epoch``'s first window starts: the same on every rank, new each epoch."""
        return random.Random(f"text-window-offset:{self.sampler.seed}:{epoch}").randrange(self.seq_len)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        index = next(self.sampler)  # advances the epoch first when the last one is used up
        starts = self.offset(self.sampler.epoch) + index * self.seq_len
        return _windows(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)


# -- building and loading --------------------------------------------------------------------------


def load_text(path: str | None = None, *, val_fraction: float = 0.05, test_fraction: float = 0.05,
              split_seed: int = 0, eval_windows: int = 128, cache_dir: str | None = None) -> TextDataset:
    """The embedded corpus (``path=None``, built once and cached) or the UTF-8 text file at ``path``, split.

    Raises ConfigError naming ``data.path`` for a file that is missing, unreadable, empty, binary
    or not UTF-8, and naming the fraction that leaves a split empty.
    """
    if path is None:
        docs, source, sha = _cached_embedded_corpus(cache_dir)
    else:
        text = read_text_file(path)
        docs, source, sha = _cut_documents(text), str(path), hashlib.sha256(text.encode()).hexdigest()
    vocab = _vocabulary(docs)
    if len(vocab) > MAX_VOCAB:
        raise ConfigError("data.path", path, f"holds {len(vocab)} distinct characters, more than {MAX_VOCAB}: "
                                             "not text a character-level model can learn")
    val, test, train = _split_documents(docs, val_fraction, test_fraction, split_seed)
    encode = _encoder(vocab)
    return TextDataset(name="text", source=source, vocab=vocab, train=encode(train), val=encode(val),
                       test=encode(test), sha256=sha, eval_windows=eval_windows)


def read_text_file(path: str) -> str:
    """The text of a user's file; ConfigError (``data.path=...: reason``) for anything that is not UTF-8 text."""
    p = Path(path)
    if not p.exists():
        raise ConfigError("data.path", path, "file not found")
    if not p.is_file():
        raise ConfigError("data.path", path, "is not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError("data.path", path, f"cannot be read ({e.strerror or e})") from None
    if not raw.strip():
        raise ConfigError("data.path", path, "is empty (no text to train on)")
    nul = raw.find(b"\0", 0, 1 << 20)  # text files have none; every binary format we know has one early
    if nul >= 0:
        raise ConfigError("data.path", path, f"is binary (a NUL byte at offset {nul}), expected a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("data.path", path, f"is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                                             "convert it, e.g. iconv -t utf-8") from None


def _cut_documents(text: str) -> list[str]:
    """A user's text in pieces of ~DOC_CHARS characters, each ending at a line end (or the text's end)."""
    docs, start = [], 0
    while start < len(text):
        end = text.find("\n", start + DOC_CHARS)
        end = len(text) if end < 0 else end + 1
        docs.append(text[start:end])
        start = end
    return docs


def _split_documents(docs: list[str], val_fraction: float, test_fraction: float,
                     split_seed: int) -> tuple[str, str, str]:
    """(val, test, train) text: documents dealt by a seeded permutation, each split in corpus order."""
    total = sum(len(d) for d in docs)
    order = list(range(len(docs)))
    random.Random(split_seed).shuffle(order)
    targets = [("data.val_fraction", val_fraction), ("data.test_fraction", test_fraction)]
    picked: list[list[int]] = [[], []]
    position = 0
    for which, (_, fraction) in enumerate(targets):
        size = 0
        while size < fraction * total and position < len(order):
            picked[which].append(order[position])
            size += len(docs[order[position]])
            position += 1
    train_ids = order[position:]
    for (key, fraction), ids in zip(targets, picked):
        if fraction > 0 and not ids:
            raise ConfigError(key, fraction, "leaves no text for its split")
    if not train_ids:
        raise ConfigError("data.val_fraction", val_fraction,
                          f"with data.test_fraction={test_fraction} leaves no text for the train split "
                          f"({len(docs)} documents)")
    join = lambda ids: "\n\n".join(docs[i] for i in sorted(ids))  # noqa: E731
    return join(picked[0]), join(picked[1]), join(train_ids)


def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _vocabulary(docs: list[str]) -> str:
    """Every character of the documents, sorted (by code point, as ``sorted`` orders a str)."""
    codes = _code_points("".join(docs))
    present = np.zeros(int(codes.max(initial=0)) + 1, dtype=bool)
    present[codes] = True  # one pass, no sort: ~10x faster than a Python set over a few MB
    return np.flatnonzero(present).astype(np.uint32).tobytes().decode("utf-32-le")


def _encoder(vocab: str):
    """text -> token ids through a table indexed by code point (every character must be in ``vocab``)."""
    dtype = np.uint8 if len(vocab) <= 256 else np.int32
    points = _code_points(vocab)
    table = np.zeros(int(points.max(initial=0)) + 1, dtype=dtype)
    table[points] = np.arange(len(points), dtype=dtype)

    def encode(text: str) -> torch.Tensor:
        return torch.from_numpy(table[_code_points(text)])

    return encode


def embedded_corpus_documents() -> tuple[list[str], str]:
    """The embedded corpus's documents, in corpus order, and a description of where they came from.

    Example::
        >>> docs, source = embedded_corpus_documents()
        >>> docs[0].splitlines()[0]
        'The "assert" statement'
    """
    import pydoc_data.topics

    docs: list[str] = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_sources(stdlib):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # a file this Python cannot parse carries no docstring we need
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=True)
                if doc and doc.strip():
                    docs.append(doc.strip())
    seen: set[str] = set()
    unique = [d for d in docs if not (d in seen or seen.add(d))]  # an exact copy would straddle the splits
    source = (f"{EMBEDDED}: pydoc_data.topics and the docstrings of the standard library in {stdlib} "
              f"(Python {sys.version.split()[0]})")
    return unique, source


def _stdlib_sources(stdlib: Path) -> list[Path]:
    found = []
    for folder, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("config-"))
        found += [Path(folder) / f for f in sorted(files) if f.endswith(".py") and not f.startswith("_sysconfigdata")]
    return found


def default_cache_dir() -> Path:
    """``$DIST_SUPERNET_CACHE``, else ``$XDG_CACHE_HOME/dist_supernet``, else ``~/.cache/dist_supernet``."""
    if os.environ.get("DIST_SUPERNET_CACHE"):
        return Path(os.environ["DIST_SUPERNET_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dist_supernet"


def _cache_key() -> str:
    what = f"{EMBEDDED}:{BUILDER_VERSION}:{sys.version}:{sysconfig.get_paths()['stdlib']}"
    return hashlib.sha256(what.encode()).hexdigest()[:16]


def _cached_embedded_corpus(cache_dir: str | None) -> tuple[list[str], str, str]:
    """(documents, source, sha256) of the embedded corpus: from the cache when it verifies, else built and cached."""
    folder = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = folder / "text" / _cache_key()
    corpus_path, meta_path = folder / "corpus.txt", folder / "meta.json"
    if corpus_path.is_file() and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            raw = corpus_path.read_bytes()
            sha = hashlib.sha256(raw).hexdigest()
            if sha == meta["sha256"]:
                text, lengths = raw.decode("utf-8"), meta["doc_lengths"]
                if sum(lengths) + 2 * max(0, len(lengths) - 1) == len(text):
                    return _unjoin(text, lengths), meta["source"], sha
            log.warning("text cache %s: checksum or layout does not match its meta.json; rebuilding it", folder)
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("text cache %s unreadable (%s); rebuilding it", folder, e)
    docs, source = embedded_corpus_documents()
    text = "\n\n".join(docs)
    raw = text.encode("utf-8")
    sha = hashlib.sha256(raw).hexdigest()
    meta = {"source": source, "sha256": sha, "doc_lengths": [len(d) for d in docs], "builder": BUILDER_VERSION}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(corpus_path, raw)
        _atomic_write(meta_path, json.dumps(meta).encode())
    except OSError as e:  # a read-only home: train anyway, without the cache
        log.warning("text cache %s not written (%s); the corpus is rebuilt at every start", folder, e)
    return docs, source, sha


def _unjoin(text: str, lengths: list[int]) -> list[str]:
    docs, start = [], 0
    for n in lengths:
        docs.append(text[start:start + n])
        start += n + 2
    return docs


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # several ranks may write the same bytes at once: the last rename wins, whole
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


__all__ = ["EMBEDDED", "TextBatches", "TextDataset", "default_cache_dir", "embedded_corpus_documents", "load_text",
           "read_text_file"]
