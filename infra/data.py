"""The data pipeline: token corpora in, (inputs, targets) batches out, identically on every
data-parallel layout and across restarts.

- `TokenDataset` reads a flat token file (`<name>.bin` of uint16/uint32 plus `<name>.json`
  metadata — the nanoGPT/Megatron layout) through a memory map, or wraps an in-memory array.
  Sample i is the window tokens[i*S : i*S+S+1]: inputs are its first S tokens, targets the
  last S.
- `DistributedBatchSampler` decides which samples each step uses. The order is a property of
  the *global* batch (seed, epoch, step), and each data-parallel rank takes a contiguous slice
  of it, so the same sequences reach the optimizer whatever the dp size — the precondition
  for loss parity across layouts and for resuming on a different number of ranks.
- `make_batch` / `split_microbatches` turn one step's indices into tensors.
- `write_synthetic_corpus` / `synthetic_tokens` make a corpus with learnable structure and a
  known entropy rate, so a demo or test can tell "the model learned" from "the loss moved".
- `tokenize_text_files` turns text into a corpus with a tokenizer the user names.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

TOKEN_DTYPES = ("uint16", "uint32")


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _token_dtype(vocab_size: int) -> str:
    # uint16 halves the file (and page-cache) size whenever the vocabulary allows it.
    return "uint16" if vocab_size <= 2 ** 16 else "uint32"


# --------------------------------------------------------------------------- dataset


class TokenDataset:
    """Fixed-length next-token windows over a flat token stream.

    `path_or_array`: a `.bin` path (metadata read from the `.json` beside it) or a 1-D integer
    array. `vocab_size`: the model's vocabulary; when given (here or in the metadata) every
    token id is checked against it once, up front, rather than failing inside an embedding
    lookup on some later step.
    """

    def __init__(self, path_or_array: str | os.PathLike | np.ndarray, seq_len: int,
                 vocab_size: int | None = None, check_tokens: bool = True) -> None:
        if int(seq_len) <= 0:
            raise ValueError(f"train.seq_len: must be a positive integer, got {seq_len}")
        self.seq_len = int(seq_len)
        self.metadata: dict = {}
        self.path: Path | None = None
        if isinstance(path_or_array, (str, os.PathLike)):
            self.path = Path(path_or_array)
            self.tokens = self._open(self.path)
            where = f"data.path: {self.path}"
        else:
            self.tokens = np.asarray(path_or_array)
            where = "data: in-memory token array"
            if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
                raise ValueError(f"{where} must be a 1-D integer array, got {self.tokens.dtype} "
                                 f"with shape {self.tokens.shape}")
        self.num_tokens = int(self.tokens.shape[0])
        if self.num_tokens < self.seq_len + 1:
            raise ValueError(f"{where} holds {self.num_tokens} tokens, too short for one sequence of "
                             f"train.seq_len={self.seq_len} (needs {self.seq_len + 1}); "
                             "use a larger corpus or a shorter seq_len")

        meta_vocab = self.metadata.get("vocab_size")
        if vocab_size is not None and meta_vocab is not None and int(meta_vocab) > int(vocab_size):
            raise ValueError(f"{where}: the corpus vocab_size={meta_vocab} exceeds model.vocab_size="
                             f"{vocab_size}; use a model with a vocabulary at least that large")
        limit = vocab_size if vocab_size is not None else meta_vocab
        self.vocab_size = int(limit) if limit is not None else None
        if check_tokens:
            self._check_token_range(where)

    def _open(self, path: Path) -> np.ndarray:
        if not path.is_file():
            raise ValueError(f"data.path: token file {path} not found")
        meta_file = _meta_path(path)
        if meta_file == path:
            raise ValueError(f"data.path: {path} is the metadata name; point data.path at the .bin token file")
        if not meta_file.is_file():
            raise ValueError(f"data.path: metadata file {meta_file} not found; a flat token file needs a "
                             'JSON file beside it, e.g. {"dtype": "uint16", "vocab_size": 32000, '
                             '"num_tokens": 1000000}')
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"data.path: metadata file {meta_file} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise ValueError(f"data.path: metadata file {meta_file} must hold a JSON object")
        dtype = meta.get("dtype")
        if dtype is None:
            raise ValueError(f'data.path: metadata {meta_file} has no "dtype" field; add "dtype": "uint16" '
                             'or "uint32" (the width the tokens were written with)')
        if dtype not in TOKEN_DTYPES:
            raise ValueError(f'data.path: metadata {meta_file} has "dtype": {dtype!r}; expected one of {TOKEN_DTYPES}')
        itemsize = np.dtype(dtype).itemsize
        size = path.stat().st_size
        if size % itemsize:
            raise ValueError(f"data.path: {path} is {size} bytes, not a whole number of {dtype} tokens; "
                             f'the metadata "dtype" does not match the file, or the write was truncated')
        n = size // itemsize
        if "num_tokens" in meta and int(meta["num_tokens"]) != n:
            raise ValueError(f'data.path: metadata {meta_file} says "num_tokens": {meta["num_tokens"]} but '
                             f"{path} holds {n} {dtype} tokens; wrong \"dtype\" or a truncated file")
        self.metadata = meta
        if n == 0:  # np.memmap refuses empty files; the length check in __init__ reports it.
            return np.zeros(0, dtype=dtype)
        # A memory map: a multi-GB corpus costs no RAM up front and the page cache is shared by
        # every rank on the node.
        return np.memmap(path, dtype=dtype, mode="r")

    def _check_token_range(self, where: str) -> None:
        # One pass over the data; a bad id here is a tokenizer/model mismatch, which would
        # otherwise surface as an opaque index error (or silent garbage on some devices).
        if np.issubdtype(self.tokens.dtype, np.signedinteger) and int(self.tokens.min()) < 0:
            raise ValueError(f"{where}: negative token id {int(self.tokens.min())}")
        if self.vocab_size is not None:
            top = int(self.tokens.max())
            if top >= self.vocab_size:
                raise ValueError(f"{where}: token id {top} >= vocab_size={self.vocab_size}; the corpus was "
                                 "tokenized with a larger vocabulary than model.vocab_size")

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {len(self)} samples")
        inputs, targets = make_batch(self, [i])
        return inputs[0], targets[0]


def make_batch(dataset: TokenDataset, indices: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample indices → (inputs, targets), both int64 of shape [len(indices), seq_len]."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(dataset)):
        raise IndexError(f"sample indices must lie in [0, {len(dataset)}), got {idx.min()}..{idx.max()}")
    # One fancy-indexing gather reads every window at once (a memmap reads only those pages).
    offsets = idx[:, None] * dataset.seq_len + np.arange(dataset.seq_len + 1)
    windows = torch.from_numpy(np.asarray(dataset.tokens[offsets], dtype=np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def split_microbatches(inputs: torch.Tensor, targets: torch.Tensor,
                       micro_batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split a rank's local batch into gradient-accumulation (or pipeline) microbatches."""
    b = inputs.shape[0]
    if micro_batch <= 0 or b % micro_batch:
        raise ValueError(f"train.micro_batch: {micro_batch} does not divide the local batch of {b} sequences "
                         "(train.global_batch / data-parallel size); pick a divisor of it")
    return list(zip(inputs.split(micro_batch), targets.split(micro_batch)))


# --------------------------------------------------------------------------- sampler


class DistributedBatchSampler:
    """Deterministic, data-parallel, resumable choice of sample indices per step.

    Epoch e visits the samples in a permutation seeded by (seed, e). Step t takes the next
    `global_batch` indices of it (an epoch's incomplete tail is dropped, then the next epoch
    starts); data-parallel rank r takes the contiguous slice r of that global batch. Position
    is kept as (epoch, batch_in_epoch) — global, so a checkpoint taken at one dp size resumes
    exactly on another. Iterating yields this rank's index list for each step, forever.
    """

    def __init__(self, dataset_len: int, global_batch: int, dp_rank: int = 0, dp_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        if global_batch <= 0:
            raise ValueError(f"train.global_batch: must be positive, got {global_batch}")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"data-parallel rank {dp_rank} is not in [0, dp_size={dp_size})")
        if global_batch % dp_size:
            raise ValueError(f"train.global_batch: {global_batch} is not divisible by the data-parallel size "
                             f"{dp_size}; use a multiple of {dp_size}")
        if dataset_len < global_batch:
            raise ValueError(f"train.global_batch: {global_batch} sequences per step exceeds the dataset's "
                             f"{dataset_len} sequences; use a larger corpus or a smaller batch/seq_len")
        self.dataset_len = int(dataset_len)
        self.global_batch = int(global_batch)
        self.dp_rank, self.dp_size = int(dp_rank), int(dp_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.local_batch = self.global_batch // self.dp_size
        self.batches_per_epoch = self.dataset_len // self.global_batch
        self.epoch = 0
        self.batch_in_epoch = 0
        self._order_epoch: int | None = None
        self._order: np.ndarray | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            if self.shuffle:
                # A private Generator seeded by (seed, epoch): independent of the global RNG
                # state and of anything else the process drew; a tuple rather than seed+epoch
                # so that neighbouring seeds do not share epochs.
                self._order = np.random.default_rng((self.seed, epoch)).permutation(self.dataset_len)
            else:
                self._order = np.arange(self.dataset_len)
            self._order_epoch = epoch
        return self._order

    @property
    def step(self) -> int:
        """Global batches consumed so far (skipped ones included)."""
        return self.epoch * self.batches_per_epoch + self.batch_in_epoch

    @property
    def consumed_samples(self) -> int:
        return self.step * self.global_batch

    def global_indices(self) -> np.ndarray:
        """The next step's whole global batch, in order, without advancing."""
        start = self.batch_in_epoch * self.global_batch
        return self._epoch_order(self.epoch)[start:start + self.global_batch]

    def _advance(self, n_batches: int) -> None:
        self.epoch, self.batch_in_epoch = divmod(self.step + n_batches, self.batches_per_epoch)

    def __iter__(self) -> "DistributedBatchSampler":
        return self

    def __next__(self) -> list[int]:
        lo = self.dp_rank * self.local_batch
        local = self.global_indices()[lo:lo + self.local_batch].tolist()
        self._advance(1)
        return local

    def skip(self, n_batches: int) -> range:
        """Advance `n_batches` global batches without yielding them (the loss-spike guard skips
        the data that blew up). Returns the global sample positions skipped."""
        if n_batches < 0:
            raise ValueError(f"skip: n_batches must be >= 0, got {n_batches}")
        start = self.consumed_samples
        self._advance(n_batches)
        return range(start, self.consumed_samples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "global_batch": self.global_batch, "consumed_samples": self.consumed_samples,
                "dataset_len": self.dataset_len}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "batch_in_epoch", "seed", "global_batch"} - set(state)
        if missing:
            raise ValueError(f"data sampler state is missing {sorted(missing)}")
        # The saved position only means something in the same sample order.
        if int(state["global_batch"]) != self.global_batch:
            raise ValueError(f"train.global_batch: the checkpoint was written with global_batch="
                             f"{state['global_batch']} but this run uses {self.global_batch}; the data "
                             "position cannot be resumed exactly — restore the original value")
        if int(state["seed"]) != self.seed:
            raise ValueError(f"train.seed: the checkpoint was written with seed={state['seed']} but this run "
                             f"uses {self.seed}; the data order would change — restore the original value")
        if "dataset_len" in state and int(state["dataset_len"]) != self.dataset_len:
            raise ValueError(f"data.path: the checkpoint's dataset had {state['dataset_len']} sequences, this "
                             f"one has {self.dataset_len} (different corpus or train.seq_len)")
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise ValueError(f"data sampler state has batch_in_epoch={batch} outside [0, {self.batches_per_epoch})")
        self.epoch, self.batch_in_epoch = epoch, batch
        if "consumed_samples" in state and int(state["consumed_samples"]) != self.consumed_samples:
            raise ValueError(f"data sampler state is inconsistent: consumed_samples={state['consumed_samples']} "
                             f"but epoch/batch_in_epoch give {self.consumed_samples}")


# --------------------------------------------------------------------------- synthetic corpus

# The synthetic "language": a first-order Markov chain. Every token has BRANCHING distinct
# successors drawn at random (the vocabulary's "grammar"), taken with fixed probabilities
# SUCCESSOR_PROBS; with probability NOISE the next token is instead uniform over the whole
# vocabulary. Because every state's next-token distribution is the same up to relabelling,
# every state has the same conditional entropy, which is therefore the chain's entropy rate:
# the lowest loss any model can reach (≈1.66 nats at vocab 512, vs ln 512 ≈ 6.24 uniform).
BRANCHING = 4
SUCCESSOR_PROBS = (0.5, 0.25, 0.15, 0.10)
NOISE = 0.05
_CHUNK = 1 << 23  # tokens generated per numpy pass; bounds temporary memory on huge corpora


def _successor_probs(vocab_size: int) -> np.ndarray:
    k = min(BRANCHING, vocab_size)
    p = np.asarray(SUCCESSOR_PROBS[:k], dtype=np.float64)
    return p / p.sum()


def synthetic_entropy_nats(vocab_size: int) -> float:
    """Entropy rate (nats/token) of the synthetic process at this vocabulary size."""
    w = _successor_probs(vocab_size)
    q = (1 - NOISE) * w + NOISE / vocab_size          # each of the k successors
    rest = (vocab_size - len(w)) * (NOISE / vocab_size)  # total mass on all other tokens
    h = -float(np.sum(q * np.log(q)))
    if rest > 0:
        h -= rest * math.log(NOISE / vocab_size)
    return h


def _successor_table(rng: np.random.Generator, vocab_size: int) -> np.ndarray:
    k = len(_successor_probs(vocab_size))
    table = rng.integers(0, vocab_size, size=(vocab_size, k))
    # Successors must be distinct for the entropy above to be exact; redraw the few rows
    # that collided (≈1% at k=4, vocab 512).
    while True:
        s = np.sort(table, axis=1)
        bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
        if not bad.any():
            return table
        table[bad] = rng.integers(0, vocab_size, size=(int(bad.sum()), k))


def _chain_chunk(rng: np.random.Generator, table: np.ndarray, probs: np.ndarray, n: int,
                 prev: int | None) -> np.ndarray:
    vocab_size, k = table.shape
    slot = rng.choice(k, size=n, p=probs)        # which successor each step would take
    jump = rng.random(n) < NOISE                 # positions drawn uniformly instead
    if prev is None:
        jump[0] = True
    out = np.empty(n, dtype=np.int64)
    out[jump] = rng.integers(0, vocab_size, size=int(jump.sum()))
    if not jump[0]:
        out[0] = table[prev, slot[0]]
    # Each run between jumps follows the chain from the token before it. Walking all runs in
    # lockstep keeps this vectorized: the loop runs as often as the longest run (~ln(n)/NOISE,
    # a few hundred), not n times, and touches each token once.
    known = jump.copy()
    known[0] = True
    cur = np.flatnonzero(known) + 1
    while True:
        cur = cur[cur < n]
        cur = cur[~known[cur]]
        if cur.size == 0:
            return out
        out[cur] = table[out[cur - 1], slot[cur]]
        cur = cur + 1


def _synthetic_chunks(num_tokens: int, vocab_size: int, seed: int) -> Iterable[np.ndarray]:
    if int(num_tokens) <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    if int(vocab_size) < 2:
        raise ValueError(f"model.vocab_size: the synthetic corpus needs vocab_size >= 2, got {vocab_size}")
    # Separate streams for the grammar and the text: the language depends only on
    # (vocab_size, seed), whatever the corpus length.
    grammar_rng, text_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    table = _successor_table(grammar_rng, vocab_size)
    probs = _successor_probs(vocab_size)
    prev = None
    for start in range(0, num_tokens, _CHUNK):
        chunk = _chain_chunk(text_rng, table, probs, min(_CHUNK, num_tokens - start), prev)
        prev = int(chunk[-1])
        yield chunk


def synthetic_tokens(num_tokens: int, vocab_size: int, seed: int = 0) -> np.ndarray:
    """The synthetic process in memory (for `data.synthetic = true`): a 1-D token array of the
    smallest unsigned dtype that holds the vocabulary."""
    dtype = _token_dtype(vocab_size)
    return np.concatenate([c.astype(dtype) for c in _synthetic_chunks(num_tokens, vocab_size, seed)])


def _synthetic_metadata(num_tokens: int, vocab_size: int, seed: int) -> dict:
    return {"dtype": _token_dtype(vocab_size), "vocab_size": int(vocab_size), "num_tokens": int(num_tokens),
            "source": "suanli synthetic Markov chain",
            "generator": {"branching": len(_successor_probs(vocab_size)), "successor_probs":
                          _successor_probs(vocab_size).tolist(), "noise": NOISE, "seed": int(seed)},
            "entropy_nats_per_token": synthetic_entropy_nats(vocab_size),
            "uniform_nats_per_token": math.log(vocab_size)}


def _write_corpus(out_path: Path, chunks: Iterable[np.ndarray], meta: dict) -> Path:
    # Written under temporary names and renamed, so a crash never leaves a .bin that looks
    # complete; the .json goes last, and TokenDataset needs both.
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        for c in chunks:
            c = np.asarray(c)
            if c.size and int(c.max()) >= 2 ** (8 * np.dtype(meta["dtype"]).itemsize):
                raise ValueError(f"token id {int(c.max())} does not fit {meta['dtype']}")
            c.astype(meta["dtype"]).tofile(f)
            n += c.size
    meta = {**meta, "num_tokens": n}
    os.replace(tmp, out_path)
    meta_file = _meta_path(out_path)
    meta_tmp = meta_file.with_name(meta_file.name + ".tmp")
    meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(meta_tmp, meta_file)
    return out_path


def write_synthetic_corpus(path: str | os.PathLike, num_tokens: int, vocab_size: int, seed: int = 0) -> Path:
    """Write the synthetic process as `path` (.bin) + metadata (.json, with the entropy rate
    under "entropy_nats_per_token"). Returns the .bin path."""
    path = Path(path)
    if path.suffix == ".json":
        raise ValueError(f"data.path: {path} is the metadata name; give the .bin path")
    return _write_corpus(path, _synthetic_chunks(num_tokens, vocab_size, seed),
                         _synthetic_metadata(num_tokens, vocab_size, seed))


# --------------------------------------------------------------------------- tokenization


def _need(package: str, tokenizer_name: str):
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ImportError(f"tokenizer {tokenizer_name!r} needs the Python package '{package}', which is not "
                          f"installed; run: pip install {package}") from None


def _load_tokenizer(tokenizer_name: str):
    """(encode(text) -> list[int], end-of-document id or None, vocab_size)."""
    if Path(tokenizer_name).exists():
        # A local directory (or tokenizer.json) is a Hugging Face tokenizer; never downloaded.
        transformers = _need("transformers", tokenizer_name)
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer_name, local_files_only=True)
        return (lambda text: tok.encode(text, add_special_tokens=False)), tok.eos_token_id, len(tok)
    tiktoken = _need("tiktoken", tokenizer_name)
    enc = tiktoken.get_encoding(tokenizer_name)  # a tiktoken encoding name, e.g. "cl100k_base"
    return enc.encode_ordinary, enc.eot_token, enc.n_vocab


def tokenize_text_files(paths: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                        tokenizer_name: str) -> Path:
    """Tokenize UTF-8 text files into one flat corpus (`out_path` .bin + .json), one document
    per file, separated by the tokenizer's end-of-document token.

    `tokenizer_name`: a tiktoken encoding name (needs `pip install tiktoken`) or a local
    Hugging Face tokenizer directory (needs `pip install transformers`).
    """
    encode, eod, vocab_size = _load_tokenizer(tokenizer_name)
    files = [Path(p) for p in paths]
    for p in files:
        if not p.is_file():
            raise ValueError(f"data: text file {p} not found")

    def chunks():
        for p in files:
            ids = list(encode(p.read_text(encoding="utf-8")))
            if eod is not None:
                ids.append(eod)
            yield np.asarray(ids, dtype=np.int64)

    meta = {"dtype": _token_dtype(vocab_size), "vocab_size": int(vocab_size), "num_tokens": 0,
            "source": "tokenize_text_files", "tokenizer": tokenizer_name, "documents": len(files)}
    return _write_corpus(Path(out_path), chunks(), meta)


__all__ = ["TokenDataset", "DistributedBatchSampler", "make_batch", "split_microbatches",
           "synthetic_tokens", "synthetic_entropy_nats", "write_synthetic_corpus", "tokenize_text_files"]
