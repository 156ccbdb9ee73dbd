"""LSA initialisation of the token embedding (pipeline.encoder.embedding_init) and its use by
pretrain: shapes, determinism for a seed, train-only statistics, untouched special rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import read_params
from pipeline.domain import N_SPECIAL
from pipeline.encoder.embedding_init import init_embedding, install_vectors, lsa_vectors, occurring
from pipeline.encoder.model import ModelParams
from pipeline.encoder.tokens import DocumentTokens
from pipeline.stages.pretrain import PretrainParams, initial_model

VOCAB = 60
DIM = 8


def topic_docs(n: int = 80, seed: int = 0) -> list[np.ndarray]:
    """Two topics with disjoint vocabularies (ids 5-29 and 30-54); ids 55-59 never occur."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        low = 5 if i % 2 == 0 else 30
        docs.append(rng.integers(low, low + 25, size=int(rng.integers(10, 40))).astype(np.int32))
    return docs


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_lsa_vectors_have_one_row_per_token_and_repeat_for_a_seed() -> None:
    docs = topic_docs()
    first = lsa_vectors(docs, VOCAB, DIM, seed=3, power=0.5)
    assert first.shape == (VOCAB, DIM) and first.dtype == np.float32
    np.testing.assert_array_equal(first, lsa_vectors(docs, VOCAB, DIM, seed=3, power=0.5))


def test_tokens_of_one_topic_get_similar_vectors() -> None:
    v = lsa_vectors(topic_docs(), VOCAB, DIM, seed=0, power=0.5)
    same = np.mean([cosine(v[5], v[j]) for j in range(6, 30)])
    other = np.mean([cosine(v[5], v[j]) for j in range(30, 55)])
    assert same > 0.5 and same - other > 0.5, (same, other)


def test_too_few_documents_for_the_dimension_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="embedding_init=lsa needs more than d_model=8"):
        lsa_vectors(topic_docs(n=6), VOCAB, DIM, seed=0, power=0.5)


def test_installed_rows_are_centred_and_scaled_and_the_others_kept() -> None:
    docs = topic_docs()
    embedding = torch.nn.Embedding(VOCAB, DIM)
    before = embedding.weight.detach().clone()
    init_embedding(embedding, docs, "lsa", seed=0, std=0.05)
    seen = occurring(docs, VOCAB)
    assert not seen[:N_SPECIAL].any() and seen[5:55].all() and not seen[55:].any()
    after = embedding.weight.detach()
    torch.testing.assert_close(after[~torch.from_numpy(seen)], before[~torch.from_numpy(seen)])
    rows = after[torch.from_numpy(seen)].double()
    assert rows.std(correction=0).item() == pytest.approx(0.05, rel=1e-4)
    assert rows.mean(0).abs().max().item() < 1e-6


def test_none_leaves_the_random_rows() -> None:
    embedding = torch.nn.Embedding(VOCAB, DIM)
    before = embedding.weight.detach().clone()
    init_embedding(embedding, topic_docs(), "none", seed=0)
    torch.testing.assert_close(embedding.weight.detach(), before)


def test_install_vectors_writes_exactly_the_masked_rows() -> None:
    embedding = torch.nn.Embedding(4, 2)
    torch.nn.init.zeros_(embedding.weight)
    install_vectors(
        embedding, np.array([[0, 0], [1, 3], [3, 1], [9, 9]]), np.array([0, 1, 1, 0], bool), 1.0
    )
    w = embedding.weight.detach()
    assert w[0].abs().sum() == 0 and w[3].abs().sum() == 0
    assert torch.equal(w[1], -w[2])  # centred: the two rows are mirror images


def _split(docs: list[np.ndarray]) -> DocumentTokens:
    lengths = [len(d) for d in docs]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    labels = np.arange(len(docs)) % 2
    return DocumentTokens([str(i) for i in range(len(docs))], labels, np.concatenate(docs), offsets)


def test_pretrain_starts_from_the_train_split_only() -> None:
    """pretrain's initial model: LSA rows for tokens seen in train, the seeded random rows
    for the rest, and the same weights for the same seed."""
    params = read_params()  # the committed default config
    model_params = ModelParams(**{**params["model"], "d_model": DIM, "n_heads": 2, "n_layers": 1})
    pretrain = PretrainParams(**params["pretrain"])
    assert pretrain.embedding_init == "lsa"  # the default
    train = _split(topic_docs())

    torch.manual_seed(1)  # as pretrain_lm seeds everything first
    first = initial_model(model_params, pretrain, VOCAB, train, seed=1)
    torch.manual_seed(1)
    again = initial_model(model_params, pretrain, VOCAB, train, seed=1)
    for a, b in zip(first.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)

    torch.manual_seed(1)
    random = initial_model(
        model_params, pretrain.model_copy(update={"embedding_init": "none"}), VOCAB, train, seed=1
    )
    torch.manual_seed(1)
    lsa = initial_model(model_params, pretrain, VOCAB, train, seed=1)
    w_random, w_lsa = random.encoder.tok_emb.weight, lsa.encoder.tok_emb.weight
    assert torch.equal(w_lsa[55:], w_random[55:])  # never in train: random rows
    assert torch.equal(w_lsa[:N_SPECIAL], w_random[:N_SPECIAL])
    assert not torch.equal(w_lsa[5:55], w_random[5:55])
