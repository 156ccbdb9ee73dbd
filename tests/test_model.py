"""Unit tests of the encoder, pooling, masking and the long-document collators."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.domain import CLS_ID, MASK_ID, N_SPECIAL, PAD_ID, SEP_ID
from pipeline.encoder.collate import ClassifyCollator, Example, split_document
from pipeline.encoder.data import IGNORE, LMCollator, mask_tokens, next_token_labels
from pipeline.encoder.model import (
    Classifier,
    Encoder,
    LanguageModel,
    ModelParams,
    format_parameter_counts,
    parameter_counts,
    pool_chunks,
    pool_tokens,
)
from tests.helpers import default_section

VOCAB = 64


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are slower with two threads on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def params(**kw) -> ModelParams:
    base = {"d_model": 32, "n_layers": 2, "n_heads": 4, "d_ff": 64, "dropout": 0.0, "max_len": 24}
    return default_section("model", **{**base, **kw})


def batch(n: int = 3, t: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(N_SPECIAL, VOCAB, (n, t), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones(n, t, dtype=torch.bool)
    mask[1, t // 2 :] = False
    ids[~mask] = PAD_ID
    return ids, mask


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_shapes(positions: str) -> None:
    p = params(positions=positions)
    ids, mask = batch()
    assert Encoder(p, VOCAB)(ids, mask).shape == (3, 10, 32)
    chunk_mask = torch.tensor([[True, True], [True, False]])
    assert Classifier(p, VOCAB, 20)(ids, mask, chunk_mask).shape == (2, 20)
    labels = torch.where(mask, ids, torch.full_like(ids, IGNORE))
    loss = LanguageModel(p, VOCAB)(ids, mask, labels)
    assert loss.shape == () and torch.isfinite(loss)
    assert 0 < loss.item() < 2 * np.log(VOCAB)


def test_sequence_longer_than_max_len_is_rejected() -> None:
    ids = torch.full((1, 25), 7)
    with pytest.raises(ValueError, match="max_len"):
        Encoder(params(), VOCAB)(ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
@pytest.mark.parametrize("pooling", ["mean", "max", "cls"])
def test_padding_does_not_change_pooled_output(positions: str, pooling: str) -> None:
    torch.manual_seed(0)
    enc = Encoder(params(positions=positions), VOCAB).eval()
    ids, mask = batch()
    padded_ids = torch.cat([ids, torch.full((3, 7), PAD_ID)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(3, 7, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        a = pool_tokens(enc(ids, mask), mask, pooling)
        b = pool_tokens(enc(padded_ids, padded_mask), padded_mask, pooling)
        # the half-padded row equals the same tokens encoded alone, unpadded
        alone = pool_tokens(enc(ids[1:2, :5], mask[1:2, :5]), mask[1:2, :5], pooling)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_causal_attention_hides_later_tokens(positions: str) -> None:
    torch.manual_seed(0)
    enc = Encoder(params(positions=positions), VOCAB).eval()
    ids, mask = batch()
    changed = ids.clone()
    changed[0, 6] = (ids[0, 6] + 1 - N_SPECIAL) % (VOCAB - N_SPECIAL) + N_SPECIAL
    with torch.no_grad():
        causal, causal_changed = enc(ids, mask, causal=True), enc(changed, mask, causal=True)
        both_ways = enc(ids, mask)
        both_ways_changed = enc(changed, mask)
    torch.testing.assert_close(causal[0, :6], causal_changed[0, :6])
    assert not torch.allclose(causal[0, 6:], causal_changed[0, 6:])
    assert not torch.allclose(both_ways[0, :6], both_ways_changed[0, :6])  # the contrast
    assert torch.isfinite(causal).all()  # the padded row has no all-masked query
    # a causal prefix does not depend on padding or on what follows it
    with torch.no_grad():
        prefix = enc(ids[1:2, :3], mask[1:2, :3], causal=True)
    torch.testing.assert_close(causal[1:2, :3], prefix, atol=1e-5, rtol=1e-5)


def test_next_token_labels_and_clm_collator() -> None:
    ids = torch.tensor([[CLS_ID, 7, 8, SEP_ID], [CLS_ID, 9, SEP_ID, PAD_ID]])
    mask = ids != PAD_ID
    assert next_token_labels(ids, mask).tolist() == [
        [7, 8, SEP_ID, IGNORE],
        [9, SEP_ID, IGNORE, IGNORE],
    ]
    out = LMCollator(max_len=24, vocab_size=VOCAB, seed=3, objective="clm")(docs([100, 5]))
    assert not (out["input_ids"] == MASK_ID).any()  # nothing is masked
    assert torch.equal(out["labels"], next_token_labels(out["input_ids"], out["attention_mask"]))
    loss = LanguageModel(params(), VOCAB, "clm")(
        out["input_ids"], out["attention_mask"], out["labels"]
    )
    assert torch.isfinite(loss) and 0 < loss.item() < 2 * np.log(VOCAB)


def test_classifier_is_invariant_to_other_documents_chunks() -> None:
    """A document's logits do not depend on how many chunks its batch-mates have."""
    torch.manual_seed(0)
    model = Classifier(params(), VOCAB, 20).eval()
    ids, mask = batch(n=3)
    with torch.no_grad():
        together = model(ids, mask, torch.tensor([[True, True], [True, False]]))
        alone = model(ids[2:], mask[2:], torch.tensor([[True]]))
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=1e-5)


def test_pool_tokens_max_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, -4.0], [3.0, -2.0], [9.0, 9.0]]])
    mask = torch.tensor([[True, True, False]])
    torch.testing.assert_close(pool_tokens(hidden, mask, "max"), torch.tensor([[3.0, -2.0]]))
    torch.testing.assert_close(pool_tokens(hidden, mask, "mean"), torch.tensor([[2.0, -3.0]]))


def test_pool_chunks_mean_and_max() -> None:
    chunks = torch.tensor([[1.0, -1.0], [3.0, -5.0], [-2.0, 4.0]])
    chunk_mask = torch.tensor([[True, True], [True, False]])
    torch.testing.assert_close(
        pool_chunks(chunks, chunk_mask, "mean"), torch.tensor([[2.0, -3.0], [-2.0, 4.0]])
    )
    torch.testing.assert_close(
        pool_chunks(chunks, chunk_mask, "max"), torch.tensor([[3.0, -1.0], [-2.0, 4.0]])
    )


def test_masking_never_touches_special_or_pad_tokens() -> None:
    ids, _ = batch(n=64, t=40)
    ids[:, 5] = SEP_ID
    ids[:, 6] = 1  # [UNK]
    ids[:, 7] = MASK_ID
    special = ids < N_SPECIAL
    for seed in range(5):
        masked, labels = mask_tokens(ids, VOCAB, 0.9, torch.Generator().manual_seed(seed))
        assert (labels[special] == IGNORE).all()
        assert torch.equal(masked[special], ids[special])
        chosen = labels != IGNORE
        assert torch.equal(labels[chosen], ids[chosen])
        # a replacement is [MASK] or a content token, never another special token
        changed = masked != ids
        assert ((masked[changed] == MASK_ID) | (masked[changed] >= N_SPECIAL)).all()
        assert torch.equal(masked[~chosen], ids[~chosen])


def test_mask_rate_and_80_10_10_split() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(N_SPECIAL, 1000, (200, 256), generator=g)
    masked, labels = mask_tokens(ids, 1000, 0.15, g)
    chosen = labels != IGNORE
    assert abs(chosen.float().mean().item() - 0.15) < 0.005
    as_mask = (masked[chosen] == MASK_ID).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(as_mask - 0.8) < 0.01
    assert abs(unchanged - 0.1) < 0.01  # (+ the rare random draw of the same token)


def test_masking_always_chooses_something() -> None:
    ids = torch.tensor([[CLS_ID, 9, SEP_ID, PAD_ID]])
    _, labels = mask_tokens(ids, VOCAB, 1e-9)
    assert labels.tolist() == [[IGNORE, 9, IGNORE, IGNORE]]


def docs(lengths: list[int]) -> list[Example]:
    rng = np.random.default_rng(0)
    return [
        Example(i, rng.integers(N_SPECIAL, VOCAB, n).astype(np.int32), i % 20)
        for i, n in enumerate(lengths)
    ]


def test_mlm_collator_takes_windows_and_wraps_them() -> None:
    examples = docs([100, 5, 0, 22])
    collate = LMCollator(max_len=24, vocab_size=VOCAB, mask_rate=0.15, seed=3)
    out = collate(examples)
    assert out["input_ids"].shape == (4, 24)
    assert out["attention_mask"].sum(1).tolist() == [24, 7, 2, 24]
    assert (out["input_ids"][:, 0] == CLS_ID).all()
    # the original (unmasked) window is a contiguous slice of its document
    restored = torch.where(out["labels"] != IGNORE, out["labels"], out["input_ids"])
    window = restored[0, 1:23].numpy()
    doc = examples[0].tokens
    assert any(np.array_equal(doc[s : s + 22], window) for s in range(len(doc) - 21))
    assert restored[0, 23] == SEP_ID
    # fixed seed: the same batch gives the same windows and masks
    again = collate(examples)
    assert all(torch.equal(out[k], again[k]) for k in out)
    # training mode (no seed): fresh windows from the global RNG
    torch.manual_seed(0)
    train = LMCollator(max_len=24, vocab_size=VOCAB)
    starts = {tuple(train(examples[:1])["input_ids"][0, 1:4].tolist()) for _ in range(20)}
    assert len(starts) > 5


@pytest.mark.parametrize("n", [0, 1, 10, 11, 25, 30, 40, 41, 200])
def test_chunking_covers_documents(n: int) -> None:
    tokens = np.arange(100, 100 + n)
    chunks = split_document(tokens, "chunk", body_len=10, max_chunks=4, head_fraction=0.25)
    assert 1 <= len(chunks) <= 4
    assert all(1 <= len(c) <= 10 or n == 0 for c in chunks)
    covered = np.unique(np.concatenate(chunks))
    if n <= 40:  # fits in max_chunks: every token is seen, in order within each chunk
        assert np.array_equal(covered, tokens)
        assert all(len(c) == 10 for c in chunks) or n < 10
    else:  # longer documents are cut after max_chunks chunks
        assert np.array_equal(covered, tokens[:40])
    for c in chunks:
        assert np.array_equal(c, np.arange(c[0], c[0] + len(c))) if len(c) else True


def test_head_tail_and_head() -> None:
    tokens = np.arange(100)
    (ht,) = split_document(tokens, "head_tail", body_len=20, max_chunks=4, head_fraction=0.25)
    assert ht.tolist() == [*range(5), *range(85, 100)]
    (h,) = split_document(tokens, "head", body_len=20, max_chunks=4, head_fraction=0.25)
    assert h.tolist() == list(range(20))
    (short,) = split_document(tokens[:7], "head_tail", body_len=20, max_chunks=4, head_fraction=0.5)
    assert short.tolist() == list(range(7))


def test_classify_collator_layout() -> None:
    examples = docs([30, 3, 0, 100])
    out = ClassifyCollator(max_len=12, strategy="chunk", max_chunks=3)(examples)
    assert out["chunk_mask"].sum(1).tolist() == [3, 1, 1, 3]
    assert out["input_ids"].shape[0] == 8
    lengths = out["attention_mask"].sum(1)
    assert (out["input_ids"][:, 0] == CLS_ID).all()
    assert (out["input_ids"][torch.arange(8), lengths - 1] == SEP_ID).all()
    assert out["labels"].tolist() == [0, 1, 2, 3]
    assert out["index"].tolist() == [0, 1, 2, 3]
    # chunks are listed document by document: the second row starts document 0's 2nd chunk
    assert out["input_ids"][1, 1:11].tolist() == examples[0].tokens[10:20].tolist()
    assert out["input_ids"][3, 1:4].tolist() == examples[1].tokens.tolist()


def test_parameter_counts() -> None:
    p = params(n_layers=2, d_model=32, d_ff=64)
    d, f = 32, 64
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    encoder = VOCAB * d + 24 * d + 2 * block + 2 * d
    counts = parameter_counts(LanguageModel(p, VOCAB))
    # the output projection is tied to the embedding: only dense, norm and bias are new
    assert counts["total"] == encoder + (d * d + d) + 2 * d + VOCAB
    assert counts["encoder.tok_emb"] == VOCAB * d
    assert counts["encoder.blocks"] == 2 * block
    clf = parameter_counts(Classifier(p, VOCAB, 20))
    assert clf["total"] == encoder + d * 20 + 20 == clf["trainable"]
    assert "parameters (trainable" in format_parameter_counts(clf)
    rotary = parameter_counts(Encoder(params(positions="rotary"), VOCAB))
    assert rotary["total"] == encoder - 24 * d


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"d_model": 30}, "divisible"),
        ({"n_heads": 8, "positions": "rotary", "d_model": 24}, "even d_model / n_heads"),
        ({"max_len": 2}, "max_len"),
        ({"positions": "alibi"}, "positions"),
        ({"d_model": 32.0}, "d_model"),
    ],
)
def test_model_params_are_checked(change: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        params(**change)
