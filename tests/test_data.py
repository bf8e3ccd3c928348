"""Data pipeline: dataset windows and errors, the distributed resumable sampler, batches,
the synthetic corpus's learnability, and the tokenizer path."""

from __future__ import annotations

import json
import math
import sys
import types

import numpy as np
import pytest
import torch

from suanli.infra.data import (DistributedBatchSampler, TokenDataset, make_batch, split_microbatches,
                               synthetic_tokens, tokenize_text_files, write_synthetic_corpus)


def write_flat(tmp_path, tokens, meta, name="c"):
    path = tmp_path / f"{name}.bin"
    np.asarray(tokens).astype(meta.get("dtype", "uint16")).tofile(path)
    (tmp_path / f"{name}.json").write_text(json.dumps(meta))
    return path


# --------------------------------------------------------------------------- dataset


def test_windows_from_array():
    ds = TokenDataset(np.arange(23), seq_len=5)
    assert len(ds) == (23 - 1) // 5 == 4
    x, y = ds[2]
    assert x.dtype == torch.int64 and y.dtype == torch.int64
    assert x.tolist() == [10, 11, 12, 13, 14]
    assert y.tolist() == [11, 12, 13, 14, 15]
    x, y = ds[3]  # the last full window ends at token 20, inside the 23
    assert y.tolist()[-1] == 20
    with pytest.raises(IndexError):
        ds[4]


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_windows_from_memmapped_file(tmp_path, dtype):
    tokens = np.arange(100, dtype=np.int64) + (70000 if dtype == "uint32" else 0)
    path = write_flat(tmp_path, tokens, {"dtype": dtype, "num_tokens": 100})
    ds = TokenDataset(path, seq_len=8)
    assert isinstance(ds.tokens, np.memmap) and ds.num_tokens == 100 and len(ds) == 12
    x, y = ds[1]
    assert x.tolist() == tokens[8:16].tolist() and y.tolist() == tokens[9:17].tolist()


def test_make_batch_matches_items():
    ds = TokenDataset(np.arange(1000) % 97, seq_len=16)
    inputs, targets = make_batch(ds, [5, 0, 17])
    assert inputs.shape == targets.shape == (3, 16) and inputs.dtype == torch.int64
    for row, i in enumerate([5, 0, 17]):
        x, y = ds[i]
        assert torch.equal(inputs[row], x) and torch.equal(targets[row], y)
    with pytest.raises(IndexError):
        make_batch(ds, [len(ds)])


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"data\.path: .*not found"):
        TokenDataset(tmp_path / "nope.bin", 8)


def test_missing_metadata(tmp_path):
    path = tmp_path / "c.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    with pytest.raises(ValueError, match=r"data\.path: metadata file .*c\.json not found"):
        TokenDataset(path, 8)


def test_metadata_without_dtype(tmp_path):
    path = write_flat(tmp_path, np.arange(100), {"vocab_size": 512})
    with pytest.raises(ValueError, match='"dtype"'):
        TokenDataset(path, 8)


def test_metadata_bad_dtype(tmp_path):
    path = write_flat(tmp_path, np.arange(100), {"dtype": "int8"})
    with pytest.raises(ValueError, match="int8"):
        TokenDataset(path, 8)


def test_metadata_dtype_mismatch(tmp_path):
    # written as uint16 but described as uint32: num_tokens no longer matches
    path = tmp_path / "c.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    (tmp_path / "c.json").write_text(json.dumps({"dtype": "uint32", "num_tokens": 100}))
    with pytest.raises(ValueError, match="num_tokens"):
        TokenDataset(path, 8)
    # an odd byte count cannot be uint32 at all
    np.arange(101, dtype=np.uint16).tofile(path)
    (tmp_path / "c.json").write_text(json.dumps({"dtype": "uint32"}))
    with pytest.raises(ValueError, match="whole number of uint32"):
        TokenDataset(path, 8)


def test_invalid_json(tmp_path):
    path = tmp_path / "c.bin"
    np.arange(100, dtype=np.uint16).tofile(path)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        TokenDataset(path, 8)


def test_too_short_for_one_sequence(tmp_path):
    path = write_flat(tmp_path, np.arange(8), {"dtype": "uint16", "num_tokens": 8})
    with pytest.raises(ValueError, match=r"too short.*train\.seq_len=8"):
        TokenDataset(path, 8)
    assert len(TokenDataset(path, 7)) == 1
    with pytest.raises(ValueError, match="too short"):
        TokenDataset(np.zeros(0, dtype=np.int64), 4)


def test_token_out_of_vocab(tmp_path):
    tokens = np.arange(100) % 50
    tokens[77] = 600
    path = write_flat(tmp_path, tokens, {"dtype": "uint16"})
    TokenDataset(path, 8)  # no vocabulary known: nothing to check against
    TokenDataset(path, 8, vocab_size=601)
    with pytest.raises(ValueError, match="token id 600 >= vocab_size=512"):
        TokenDataset(path, 8, vocab_size=512)
    # metadata vocabulary alone is enough to check against
    path = write_flat(tmp_path, tokens, {"dtype": "uint16", "vocab_size": 512}, name="d")
    with pytest.raises(ValueError, match="token id 600"):
        TokenDataset(path, 8)
    with pytest.raises(ValueError, match="model.vocab_size"):
        TokenDataset(write_flat(tmp_path, tokens % 50, {"dtype": "uint16", "vocab_size": 32000}, name="e"),
                     8, vocab_size=512)
    with pytest.raises(ValueError, match="token id 600"):
        TokenDataset(tokens, 8, vocab_size=512)
    with pytest.raises(ValueError, match="negative"):
        TokenDataset(np.array([1, -2, 3, 4]), 2)


def test_bad_array_and_seq_len():
    with pytest.raises(ValueError, match="1-D integer"):
        TokenDataset(np.ones(100, dtype=np.float32), 4)
    with pytest.raises(ValueError, match="train.seq_len"):
        TokenDataset(np.arange(100), 0)


# --------------------------------------------------------------------------- sampler


def take(sampler, n):
    return [next(sampler) for _ in range(n)]


def global_batches(dataset_len, global_batch, dp_size, steps, seed=0, state=None):
    """Run every rank's sampler and concatenate their slices per step."""
    samplers = [DistributedBatchSampler(dataset_len, global_batch, r, dp_size, seed) for r in range(dp_size)]
    if state is not None:
        for s in samplers:
            s.load_state_dict(state)
    per_rank = [take(s, steps) for s in samplers]
    return [sum((per_rank[r][t] for r in range(dp_size)), []) for t in range(steps)]


def test_sampler_deterministic_and_seeded():
    a = take(DistributedBatchSampler(100, 8, seed=3), 20)
    np.random.seed(123)  # the global RNG must not matter
    torch.manual_seed(5)
    b = take(DistributedBatchSampler(100, 8, seed=3), 20)
    c = take(DistributedBatchSampler(100, 8, seed=4), 20)
    assert a == b
    assert a != c
    assert all(len(x) == 8 for x in a)


def test_epoch_is_a_permutation_without_tail_and_rolls_over():
    s = DistributedBatchSampler(50, 8, seed=1)  # 6 batches per epoch, 2 samples dropped
    epoch0 = take(s, 6)
    flat = sum(epoch0, [])
    assert len(set(flat)) == 48 and all(0 <= i < 50 for i in flat)
    assert s.epoch == 1 and s.batch_in_epoch == 0
    epoch1 = take(s, 6)
    assert epoch1 != epoch0                     # a new permutation (seeded by the epoch)
    assert len(set(sum(epoch1, []))) == 48
    assert s.consumed_samples == 12 * 8


def test_no_shuffle_is_sequential():
    s = DistributedBatchSampler(20, 4, dp_rank=1, dp_size=2, shuffle=False)
    assert take(s, 6) == [[2, 3], [6, 7], [10, 11], [14, 15], [18, 19], [2, 3]]


@pytest.mark.parametrize("dp_size", [2, 4])
def test_global_batch_independent_of_dp_size(dp_size):
    reference = global_batches(103, 8, 1, 40, seed=7)
    assert global_batches(103, 8, dp_size, 40, seed=7) == reference


def test_rank_takes_contiguous_slice():
    s = DistributedBatchSampler(64, 8, dp_rank=2, dp_size=4, seed=0)
    whole = s.global_indices().tolist()
    assert next(s) == whole[4:6]


def test_resume_continues_exactly():
    uninterrupted = take(DistributedBatchSampler(77, 6, 1, 3, seed=11), 40)
    first = DistributedBatchSampler(77, 6, 1, 3, seed=11)
    take(first, 17)  # crosses the 12-batch epoch boundary
    state = json.loads(json.dumps(first.state_dict()))  # as it would be stored
    assert state["consumed_samples"] == 17 * 6
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 5
    resumed = DistributedBatchSampler(77, 6, 1, 3, seed=11)
    resumed.load_state_dict(state)
    assert take(resumed, 23) == uninterrupted[17:]


@pytest.mark.parametrize("old_dp, new_dp", [(2, 4), (4, 1), (1, 2)])
def test_resume_with_different_dp_size(old_dp, new_dp):
    uninterrupted = global_batches(90, 8, 1, 30, seed=2)
    saver = DistributedBatchSampler(90, 8, dp_rank=old_dp - 1, dp_size=old_dp, seed=2)
    take(saver, 13)
    resumed = global_batches(90, 8, new_dp, 17, seed=2, state=saver.state_dict())
    assert resumed == uninterrupted[13:]


def test_resume_refuses_changed_order():
    s = DistributedBatchSampler(90, 8, seed=2)
    take(s, 3)
    state = s.state_dict()
    with pytest.raises(ValueError, match="train.global_batch"):
        DistributedBatchSampler(90, 16, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="train.seed"):
        DistributedBatchSampler(90, 8, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="dataset"):
        DistributedBatchSampler(200, 8, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="missing"):
        DistributedBatchSampler(90, 8, seed=2).load_state_dict({"epoch": 0})


def test_skip():
    uninterrupted = take(DistributedBatchSampler(60, 4, seed=5), 30)
    s = DistributedBatchSampler(60, 4, seed=5)
    take(s, 3)
    skipped = s.skip(14)  # crosses the 15-batch epoch boundary
    assert skipped == range(12, 68)
    assert take(s, 13) == uninterrupted[17:30]
    assert s.skip(0) == range(s.consumed_samples, s.consumed_samples)
    with pytest.raises(ValueError):
        s.skip(-1)


def test_sampler_config_errors():
    with pytest.raises(ValueError, match="train.global_batch"):
        DistributedBatchSampler(100, 6, dp_rank=0, dp_size=4)
    with pytest.raises(ValueError, match="train.global_batch"):
        DistributedBatchSampler(10, 16)
    with pytest.raises(ValueError, match="rank"):
        DistributedBatchSampler(100, 8, dp_rank=2, dp_size=2)


def test_split_microbatches():
    ds = TokenDataset(np.arange(500), 10)
    inputs, targets = make_batch(ds, list(range(8)))
    micro = split_microbatches(inputs, targets, 2)
    assert len(micro) == 4
    assert torch.equal(torch.cat([m[0] for m in micro]), inputs)
    assert torch.equal(micro[1][1], targets[2:4])
    with pytest.raises(ValueError, match="train.micro_batch"):
        split_microbatches(inputs, targets, 3)
    with pytest.raises(ValueError, match="train.micro_batch"):
        split_microbatches(inputs, targets, 0)


# --------------------------------------------------------------------------- synthetic corpus


def bigram_cross_entropy(train, test, vocab, alpha=0.01):
    counts = np.bincount(train[:-1] * vocab + train[1:], minlength=vocab * vocab).reshape(vocab, vocab) + alpha
    probs = counts / counts.sum(axis=1, keepdims=True)
    return float(-np.log(probs[test[:-1], test[1:]]).mean())


def test_synthetic_corpus_is_learnable(tmp_path):
    vocab = 512
    path = write_synthetic_corpus(tmp_path / "syn.bin", 400_000, vocab, seed=1)
    meta = json.loads((tmp_path / "syn.json").read_text())
    assert meta["dtype"] == "uint16" and meta["num_tokens"] == 400_000 and meta["vocab_size"] == vocab
    entropy = meta["entropy_nats_per_token"]
    assert 0 < entropy < 0.5 * math.log(vocab)

    ds = TokenDataset(path, 64, vocab_size=vocab)
    tokens = np.asarray(ds.tokens, dtype=np.int64)
    assert tokens.max() < vocab
    half = len(tokens) // 2
    ce = bigram_cross_entropy(tokens[:half], tokens[half:], vocab)
    assert ce < 0.6 * math.log(vocab)
    # A count model cannot beat the true entropy rate (beyond sampling noise) and should come close.
    assert entropy - 0.05 < ce < entropy + 0.15


def test_synthetic_tokens_match_file_and_are_seeded(tmp_path):
    a = synthetic_tokens(50_000, 300, seed=9)
    b = synthetic_tokens(50_000, 300, seed=9)
    assert np.array_equal(a, b) and a.dtype == np.uint16
    assert not np.array_equal(a, synthetic_tokens(50_000, 300, seed=10))
    path = write_synthetic_corpus(tmp_path / "s.bin", 50_000, 300, seed=9)
    assert np.array_equal(np.fromfile(path, dtype=np.uint16), a)
    assert synthetic_tokens(1000, 70_000, seed=0).dtype == np.uint32
    # the in-memory array feeds the dataset directly (config data.synthetic = true)
    assert len(TokenDataset(a, 100, vocab_size=300)) == (50_000 - 1) // 100


def test_synthetic_tokens_tiny_vocab():
    t = synthetic_tokens(5000, 2, seed=0)
    assert set(np.unique(t).tolist()) == {0, 1}
    with pytest.raises(ValueError, match="vocab_size"):
        synthetic_tokens(100, 1)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_missing_package_names_it(tmp_path, monkeypatch):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import fails even if installed
    with pytest.raises(ImportError, match="pip install tiktoken"):
        tokenize_text_files([text], tmp_path / "out.bin", "cl100k_base")
    monkeypatch.setitem(sys.modules, "transformers", None)
    tok_dir = tmp_path / "my-tokenizer"
    tok_dir.mkdir()
    with pytest.raises(ImportError, match="pip install transformers"):
        tokenize_text_files([text], tmp_path / "out.bin", str(tok_dir))


def test_tokenize_with_a_stand_in_tiktoken(tmp_path, monkeypatch):
    # A stand-in module with tiktoken's interface exercises the writing path without the package.
    class Encoding:
        n_vocab = 300
        eot_token = 299

        def encode_ordinary(self, text):
            return list(text.encode("utf-8"))

    fake = types.ModuleType("tiktoken")
    fake.get_encoding = lambda name: Encoding()
    monkeypatch.setitem(sys.modules, "tiktoken", fake)
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("hi")
    out = tokenize_text_files([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "corpus.bin", "bytes")
    assert np.fromfile(out, dtype=np.uint16).tolist() == [97, 98, 99, 299, 104, 105, 299]
    meta = json.loads((tmp_path / "corpus.json").read_text())
    assert meta["num_tokens"] == 7 and meta["vocab_size"] == 300 and meta["dtype"] == "uint16"
    assert len(TokenDataset(out, 3)) == 2
    with pytest.raises(ValueError, match="not found"):
        tokenize_text_files([tmp_path / "missing.txt"], tmp_path / "x.bin", "bytes")
