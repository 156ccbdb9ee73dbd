"""The linear bag model (`wide`) and the `blend` stage: features, fit, save/load, folds,
weights, cross-fitting, and bad input as one error line."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml
from sklearn.svm import LinearSVC

from pipeline.bag import bag_features, count_matrix
from pipeline.blending import blended, cross_fit, fit_weights, fold_ids
from pipeline.domain import LOGIT_COLUMNS
from pipeline.errors import PipelineError
from pipeline.predictions import make_table
from pipeline.wide_model import WideModel
from tests.helpers import ROOT, assert_failed_cleanly, params_with, run_stage, stage_files

VOCAB = 50


def test_bag_features_add_hashed_bigrams_after_the_vocabulary() -> None:
    tokens = np.array([5, 6, 5, 6, 9], dtype=np.int32)
    assert bag_features(tokens, VOCAB).tolist() == tokens.tolist()
    feats = bag_features(tokens, VOCAB, bigram_buckets=1000)
    assert feats[:5].tolist() == tokens.tolist()
    bigrams = feats[5:]
    assert len(bigrams) == 4 and ((bigrams >= VOCAB) & (bigrams < VOCAB + 1000)).all()
    assert bigrams[0] == bigrams[2]  # the same pair (5, 6) hashes to the same bucket
    assert len({int(b) for b in bigrams}) == 3  # (5,6), (6,5), (6,9): order matters
    np.testing.assert_array_equal(bag_features(tokens, VOCAB, 1000), feats)  # stable


def test_count_matrix_counts_every_feature_of_the_whole_document() -> None:
    docs = [np.array([5, 6, 5]), np.array([], dtype=np.int32), np.array([7])]
    counts = count_matrix(docs, VOCAB, 0).toarray()
    assert counts.shape == (3, VOCAB)
    assert counts[0, 5] == 2 and counts[0, 6] == 1 and counts[1].sum() == 0
    assert count_matrix(docs, VOCAB, 16).shape == (3, VOCAB + 16)


def corpus(seed: int = 0, n: int = 300, k: int = 4) -> tuple[list[np.ndarray], np.ndarray]:
    """Token documents whose class shows in a few class-specific tokens."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % k
    docs = [
        np.concatenate([rng.integers(10, VOCAB, 20), np.full(3, 5 + y)]).astype(np.int32)
        for y in labels
    ]
    return docs, labels


def texts_of(labels: np.ndarray, seed: int = 0) -> list[str]:
    """Raw texts whose class shows only in a word (``Topic0`` ..), amid shared noise words."""
    rng = np.random.default_rng(seed)
    noise = [f"w{i}" for i in range(30)]
    return [" ".join([*rng.choice(noise, 8), f"Topic{y}"]) for y in labels]


FEATURE_OPTIONS = {"bigram_buckets": 64, "word_min_df": 2, "char_min_df": None}
SVM_OPTIONS = {"C": 1.0, "max_iter": 1000, "seed": 0}


def fit(docs, texts, labels, k: int = 4, **options) -> tuple[WideModel, dict]:
    """The features of the documents, then a LinearSVC on their rows, as the wide stage
    fits; ``options`` override either step's."""
    assert set(options) <= FEATURE_OPTIONS.keys() | SVM_OPTIONS.keys(), options
    features = {key: options.get(key, value) for key, value in FEATURE_OPTIONS.items()}
    svm = {key: options.get(key, value) for key, value in SVM_OPTIONS.items()}
    model, rows, info = WideModel.fit_features(docs, texts, vocab_size=VOCAB, **features)
    model, svm_info = model.fit_classifier(rows, labels, k, **svm)
    return model, info | svm_info


def test_wide_model_fits_predicts_and_round_trips_through_its_files(tmp_path) -> None:
    docs, labels = corpus()
    texts = texts_of(labels)
    model, info = fit(docs, texts, labels)
    assert info["converged"] and info["words"] == 34  # 30 noise words, 4 topics, lowercased
    assert info["features"] == VOCAB + 64 + 34 and "topic0" in model.vocabularies["words"]
    logits = model.logits(docs, texts)
    assert logits.shape == (300, 4) and (logits.argmax(1) == labels).mean() > 0.95
    rows = model.features(docs[:5], texts[:5]).toarray()
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0)  # L2 rows
    model.save(tmp_path / "wide")
    again = WideModel.load(tmp_path / "wide")
    assert again.vocabularies == model.vocabularies
    np.testing.assert_array_equal(again.logits(docs, texts), logits)  # the files hold the model
    # the features alone score no class; the classifier scores their rows as logits() does
    bare, rows, _ = WideModel.fit_features(docs, texts, vocab_size=VOCAB, **FEATURE_OPTIONS)
    assert bare.logits(docs[:2], texts[:2]).shape == (2, 0)
    np.testing.assert_allclose(model.score(rows), logits, rtol=1e-6, atol=1e-9)


def test_wide_model_reads_the_words_of_the_raw_text() -> None:
    """Tokens that say nothing, words that say the class: the word block carries it, and
    without it (``word_min_df=None``) the model is at chance."""
    _, labels = corpus()
    rng = np.random.default_rng(1)
    docs = [rng.integers(10, VOCAB, 20).astype(np.int32) for _ in labels]
    texts = texts_of(labels)
    with_words, _ = fit(docs[:200], texts[:200], labels[:200])
    without, info = fit(docs[:200], texts[:200], labels[:200], word_min_df=None)
    assert "words" not in info and without.vocabularies == {}
    held_out = (docs[200:], texts[200:])
    assert (with_words.logits(*held_out).argmax(1) == labels[200:]).mean() > 0.95
    assert (without.logits(*held_out).argmax(1) == labels[200:]).mean() < 0.5
    # a word never seen in two train posts is no feature; unseen words at predict are ignored
    words = with_words.vocabularies["words"]
    assert "w0" in words and "unseenword" not in words
    shifted = [t + " unseenword" for t in held_out[1]]
    np.testing.assert_array_equal(
        with_words.logits(held_out[0], shifted), with_words.logits(*held_out)
    )


def test_wide_model_reads_character_ngrams_within_words(tmp_path) -> None:
    """Every post's telling word is its own (``qz0x17``): no word repeats, so the word
    block cannot see the class, but the character n-grams the words share (``qz0``) can;
    and the n-gram block survives saving and loading."""
    _, labels = corpus()
    rng = np.random.default_rng(2)
    docs = [rng.integers(10, VOCAB, 20).astype(np.int32) for _ in labels]
    noise = [" ".join(rng.choice([f"w{j}" for j in range(30)], 8)) for _ in labels]
    texts = [f"{n} qz{y}x{i}" for i, (n, y) in enumerate(zip(noise, labels, strict=True))]
    words_only, _ = fit(docs[:200], texts[:200], labels[:200])
    with_chars, info = fit(docs[:200], texts[:200], labels[:200], char_min_df=2)
    assert (
        list(with_chars.vocabularies) == ["words", "chars"]
        and "qz0" in with_chars.vocabularies["chars"]
    )
    assert info["chars"] == len(with_chars.vocabularies["chars"])
    held_out = (docs[200:], texts[200:])
    assert (with_chars.logits(*held_out).argmax(1) == labels[200:]).mean() > 0.95
    assert (words_only.logits(*held_out).argmax(1) == labels[200:]).mean() < 0.5
    with_chars.save(tmp_path / "wide")
    again = WideModel.load(tmp_path / "wide")
    np.testing.assert_array_equal(again.logits(*held_out), with_chars.logits(*held_out))


def test_wide_model_needs_every_class_and_its_files(tmp_path) -> None:
    docs, labels = corpus()
    with pytest.raises(PipelineError, match="have 3 of the 4 classes"):
        fit(docs, texts_of(labels), labels % 3, max_iter=10)
    model, _ = fit(docs, texts_of(labels), labels, max_iter=10)
    model.save(tmp_path / "wide")
    (tmp_path / "wide/vocabularies.json").unlink()
    with pytest.raises(PipelineError, match="vocabularies.json not found"):
        WideModel.load(tmp_path / "wide")


def test_wide_stage_predicts_validation_held_out_and_test_with_the_refit(project) -> None:
    """Validation rows come from the model fitted on train alone (blend and calibrate fit on
    them); with refit, the LinearSVC of train + validation predicts test and is saved."""
    from pipeline.encoder.tokens import load_splits
    from pipeline.stages.wide import run
    from tests.helpers import default_section
    from tests.tiny import VOCAB as TINY_VOCAB

    splits = load_splits(project / "data/tokenized", TINY_VOCAB, 20)
    text = {
        i: " ".join(f"w{t}" for t in ex.tokens)
        for s in splits.values()
        for i, ex in zip(s.ids, s, strict=True)
    }
    (project / "data/raw").mkdir()
    documents = pd.DataFrame({"id": list(text), "text": list(text.values())})
    documents.to_parquet(project / "data/raw/documents.parquet")
    params = default_section("wide", bigram_buckets=64, word_min_df=1, char_min_df=None, refit=True)
    held, held_table, held_report = run(params.model_copy(update={"refit": False}), seed=0)
    refit, table, report = run(params, seed=0)

    val = (table["split"] == "validation").to_numpy()
    pd.testing.assert_frame_equal(table[val], held_table[val])
    logits = list(LOGIT_COLUMNS)
    assert not np.allclose(table.loc[~val, logits], held_table.loc[~val, logits])
    assert report["validation_accuracy"] == held_report["validation_accuracy"]
    assert report["refit_documents"] == 260 and "refit_documents" not in held_report
    assert report["refit"] and not held_report["refit"]
    np.testing.assert_array_equal(refit.idf, held.idf)  # the features stay train's
    train, validation = splits["train"], splits["validation"]
    rows = sp.vstack(
        [
            held.features([ex.tokens for ex in s], [text[i] for i in s.ids])
            for s in (train, validation)
        ]
    )
    labels = np.concatenate([train.labels, validation.labels])
    expected, _ = held.fit_classifier(
        rows, labels, 20, C=params.C, max_iter=params.max_iter, seed=0
    )
    # The rows are rebuilt here, so they differ from the stage's by float noise, and
    # liblinear stops at its own tolerance: the two fits agree to within a multiple of that
    # tolerance, not bit for bit (rows are L2-normalised, so a margin moves by at most the
    # norm of the coefficient difference).
    tol = 10 * LinearSVC().tol
    np.testing.assert_allclose(refit.coef, expected.coef, atol=tol)
    test = splits["test"]
    test_rows = held.features([ex.tokens for ex in test], [text[i] for i in test.ids])
    margins, expected_margins = refit.score(test_rows), expected.score(test_rows)
    np.testing.assert_allclose(margins, expected_margins, atol=tol)
    top_two = np.sort(expected_margins, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * tol  # a closer call may flip either way
    assert clear.mean() > 0.9
    assert (margins.argmax(1) == expected_margins.argmax(1))[clear].all()


def test_fold_ids_are_stratified_balanced_and_seeded() -> None:
    labels = np.array([0] * 7 + [1] * 3 + [2] * 11)
    folds = fold_ids(labels, 5, seed=1)
    assert np.bincount(folds).max() - np.bincount(folds).min() <= 1
    for c in range(3):  # each class spread over the folds as evenly as it can be
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert (fold_ids(labels, 5, seed=1) == folds).all()
    assert (fold_ids(labels, 5, seed=2) != folds).any()
    with pytest.raises(PipelineError, match="3 validation rows cannot fill 5 folds"):
        fold_ids(labels[:3], 5, 0)


def synthetic_parts(n: int = 3000, k: int = 5, weights=(0.5, 3.0), seed: int = 0):
    rng = np.random.default_rng(seed)
    parts = rng.normal(size=(len(weights), n, k))
    logits = blended(np.array(weights), parts)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    labels = np.array([rng.choice(k, p=p) for p in probs])
    return parts, labels


def test_fit_weights_recovers_the_weights_that_made_the_labels() -> None:
    parts, labels = synthetic_parts()
    a, b = fit_weights(parts, labels, max_iter=200)
    assert a == pytest.approx(0.5, abs=0.1) and b == pytest.approx(3.0, abs=0.3)


def test_cross_fit_scores_each_fold_with_weights_fitted_on_the_others() -> None:
    parts, labels = synthetic_parts(n=600)
    out, per_fold = cross_fit(parts, labels, 3, seed=0, max_iter=200)
    folds = fold_ids(labels, 3, 0)
    assert len(per_fold) == 3
    for f in range(3):
        held = folds == f
        w = fit_weights(parts[:, ~held], labels[~held], 200)
        np.testing.assert_allclose(out[held], blended(w, parts[:, held]))
        assert w.tolist() == pytest.approx(per_fold[f], abs=1e-6)
    in_sample = blended(fit_weights(parts, labels, 200), parts)
    assert not np.allclose(out, in_sample)  # the held rows never chose their own weights


# -------------------------------------------------------------------- the blend stage


def blend_workdir(
    tmp_path, n_val: int = 40, n_test: int = 20, models: tuple[str, ...] = ("transformer", "wide")
):
    """A project folder with a documents table and two models' predictions."""
    rng = np.random.default_rng(0)
    docs = pd.DataFrame(
        {
            "id": [f"train/g/{i}" for i in range(n_val)] + [f"test/g/{i}" for i in range(n_test)],
            "split": ["validation"] * n_val + ["test"] * n_test,
            "label": rng.integers(0, 20, n_val + n_test),
        }
    )
    (tmp_path / "data/raw").mkdir(parents=True)
    docs.to_parquet(tmp_path / "data/raw/documents.parquet", index=False)
    for model in ("transformer", "wide"):
        logits = rng.normal(size=(len(docs), 20))
        logits[np.arange(len(docs)), docs["label"]] += 2.0
        table = make_table(docs["id"], docs["split"], docs["label"], logits)
        (tmp_path / f"data/predictions/{model}").mkdir(parents=True)
        table.to_parquet(tmp_path / f"data/predictions/{model}/predictions.parquet", index=False)
    params = params_with(
        seed=0,
        blend={"models": list(models), "folds": 4, "max_iter": 100},
        tracking={"enabled": False},
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return tmp_path


def test_blend_stage_writes_cross_fitted_predictions_and_its_report(tmp_path) -> None:
    import json

    work = blend_workdir(tmp_path)
    proc = run_stage("blend", work)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_parquet(work / "data/predictions/blend/predictions.parquet")
    assert table.groupby("split").size().to_dict() == {"test": 20, "validation": 40}
    state = json.loads((work / "data/models/blend/blend.json").read_text())
    report = json.loads((work / "reports/blend.json").read_text())
    assert state["models"] == ["transformer", "wide"] and len(report["fold_weights"]) == 4
    assert set(report["validation"]) == {"transformer", "wide", "blend", "blend_in_sample"}
    # test rows: the saved weights over the inputs' test logits
    parts = np.stack(
        [
            pd.read_parquet(work / f"data/predictions/{m}/predictions.parquet")
            .query("split == 'test'")
            .sort_values("id")
            .filter(like="logit_")
            .to_numpy()
            for m in ("transformer", "wide")
        ]
    )
    test = table[table["split"] == "test"].sort_values("id").filter(like="logit_").to_numpy()
    np.testing.assert_allclose(test, blended(np.array(state["weights"]), parts))


def test_blend_of_a_model_without_predictions_is_one_error_line(tmp_path) -> None:
    work = blend_workdir(tmp_path, models=("transformer", "nope"))
    before = stage_files(work)
    proc = run_stage("blend", work)
    assert_failed_cleanly(
        proc, work, "data/predictions/nope/predictions.parquet: not found", before=before
    )


def test_blend_of_predictions_missing_validation_rows_is_one_error_line(tmp_path) -> None:
    work = blend_workdir(tmp_path)
    path = work / "data/predictions/wide/predictions.parquet"
    table = pd.read_parquet(path)
    table[table["split"] == "test"].to_parquet(path, index=False)
    before = stage_files(work)
    proc = run_stage("blend", work)
    assert_failed_cleanly(proc, work, "40 validation document(s) missing", before=before)


def test_a_model_read_but_not_listed_in_dvc_yaml_is_an_error(tmp_path, monkeypatch) -> None:
    """DVC cannot template blend.models into deps: a model added to the params alone must
    fail loudly instead of being read without being a dependency."""
    from pipeline.predictions import check_listed_in_dvc_yaml

    monkeypatch.chdir(tmp_path)
    check_listed_in_dvc_yaml("blend", ["transformer"], "blend.models")  # no dvc.yaml: no check
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  blend:\n    cmd: x\n    deps:\n      - data/predictions/transformer\n"
    )
    check_listed_in_dvc_yaml("blend", ["transformer"], "blend.models")
    with pytest.raises(PipelineError, match=r"data/predictions/baseline \(blend.models\)"):
        check_listed_in_dvc_yaml("blend", ["transformer", "baseline"], "blend.models")


def test_the_default_blend_models_are_listed_in_dvc_yaml(monkeypatch) -> None:
    from pipeline.config import compose
    from pipeline.predictions import check_listed_in_dvc_yaml

    params = yaml.safe_load(compose())
    monkeypatch.chdir(ROOT)
    check_listed_in_dvc_yaml("blend", params["blend"]["models"], "blend.models")
