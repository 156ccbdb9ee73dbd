"""Conformal prediction sets: the coverage guarantee on exchangeable synthetic data,
thresholds and nesting, the Mondrian fallback, the JSON state, cross-fitting, evaluation
helpers, and a cross-check of LAC and APS against MAPIE."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin

from pipeline import conformal as C
from pipeline import conformal_metrics as CM

LEVELS = (0.9, 0.95)
COMBOS = [(m, v) for m in C.METHODS for v in C.VARIANTS]


def synthetic(seed: int, n: int, k: int = 10, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities of Gaussian logits, labels drawn from them: calibrated and
    exchangeable rows (continuous scores, so no ties)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=scale, size=(n, k))
    probs = np.exp(z - z.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    u = rng.random(n)[:, None]
    labels = np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), k - 1)
    return probs, labels


def split(seed: int, n_cal: int, n_test: int, k: int = 10) -> tuple[np.ndarray, ...]:
    probs, labels = synthetic(seed, n_cal + n_test, k)
    return probs[:n_cal], labels[:n_cal], probs[n_cal:], labels[n_cal:]


# --- the guarantee -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "variant"), COMBOS)
def test_coverage_is_at_least_the_level_over_many_seeds(method: str, variant: str) -> None:
    """Split conformal: E[coverage] in [level, level + 1/(n+1)] for continuous scores."""
    n_cal, n_test, seeds = 400, 400, 200
    cov = {level: [] for level in LEVELS}
    for seed in range(seeds):
        cal_p, cal_y, test_p, test_y = split(seed, n_cal, n_test)
        state = C.fit_conformal(cal_p, cal_y, LEVELS)
        for level in LEVELS:
            cov[level].append(
                CM.coverage(C.set_mask(test_p, state, level, method, variant), test_y)
            )
    for level in LEVELS:
        values = np.array(cov[level])
        se = values.std(ddof=1) / math.sqrt(seeds)
        assert values.mean() >= level - 4 * se, (level, values.mean(), se)
        if variant == "marginal":  # Mondrian fits ~n/k rows per class: looser from above
            assert values.mean() <= level + 1 / (n_cal + 1) + 4 * se, (level, values.mean())


def test_mondrian_covers_every_class_and_marginal_can_miss_a_hard_one() -> None:
    """Per-class coverage >= level (averaged over seeds) for Mondrian, not for marginal,
    when one class is much harder than the others."""
    level, seeds, k = 0.9, 100, 5
    per_class = {"marginal": [], "mondrian": []}
    for seed in range(seeds):
        probs, labels = synthetic(seed, 1200, k)
        hard = labels == 0  # class 0: its true probability shrunk after drawing the label
        probs[hard, 0] *= 0.1
        probs /= probs.sum(axis=1, keepdims=True)
        state = C.fit_conformal(probs[:600], labels[:600], [level])
        for variant in per_class:
            mask = C.set_mask(probs[600:], state, level, "lac", variant)
            per_class[variant].append(CM.class_coverage(mask, labels[600:]))
    mondrian = np.nanmean(per_class["mondrian"], axis=0)
    assert np.all(mondrian >= level - 0.02), mondrian
    assert np.nanmean(per_class["marginal"], axis=0)[0] < level - 0.05


def test_threshold_is_the_ceil_n_plus_1_level_order_statistic() -> None:
    scores = np.random.default_rng(0).permutation(np.arange(1.0, 101.0))  # 1..100
    assert C.conformal_quantile(scores, 0.9) == 91.0  # ceil(101 * 0.9) = 91
    assert C.conformal_quantile(scores, 0.95) == 96.0  # ceil(95.95) = 96
    assert C.conformal_quantile(scores, 0.99) == 100.0  # ceil(99.99) = 100 = n
    assert C.conformal_quantile(scores[:98], 0.99) == math.inf  # rank 99 > 98 rows
    assert C.conformal_quantile(np.array([]), 0.5) == math.inf


@pytest.mark.parametrize("level", [0.5, 0.8, 0.9, 0.95, 0.975, 0.99, 0.999])
def test_min_rows_is_where_the_threshold_becomes_finite(level: float) -> None:
    need = C.min_rows(level)
    assert need == math.ceil(round(level / (1 - level), 6))
    assert C.conformal_quantile(np.linspace(0, 1, need), level) < math.inf
    assert C.conformal_quantile(np.linspace(0, 1, need - 1), level) == math.inf


def test_min_rows_of_the_usual_levels() -> None:
    assert (C.min_rows(0.9), C.min_rows(0.95), C.min_rows(0.99)) == (9, 19, 99)


# --- scores, sets, nesting ---------------------------------------------------------------


def test_scores_by_hand() -> None:
    probs = np.array([[0.5, 0.3, 0.2], [0.4, 0.2, 0.4]])
    np.testing.assert_allclose(C.class_scores(probs, "lac"), [[0.5, 0.7, 0.8], [0.6, 0.8, 0.6]])
    # APS: mass ranked at or above the class (ties broken by class index: 0 before 2)
    np.testing.assert_allclose(C.class_scores(probs, "aps"), [[0.5, 0.8, 1.0], [0.4, 1.0, 0.8]])
    with pytest.raises(ValueError, match="method must be one of"):
        C.class_scores(probs, "raps")


def test_prediction_sets_list_classes_most_probable_first() -> None:
    cal_p, cal_y, test_p, _ = split(3, 300, 50)
    state = C.fit_conformal(cal_p, cal_y, LEVELS)
    for method, variant in COMBOS:
        mask = C.set_mask(test_p, state, 0.95, method, variant)
        sets = C.prediction_sets(test_p, state, 0.95, method, variant)
        for row, chosen, probs in zip(mask, sets, test_p, strict=True):
            assert sorted(chosen) == np.flatnonzero(row).tolist()
            assert list(probs[chosen]) == sorted(probs[chosen], reverse=True)
        assert sets == C.prediction_sets(test_p, state, 0.95, method, variant)  # deterministic


def test_thresholds_are_monotone_and_sets_nested_in_the_level() -> None:
    levels = [0.5, 0.8, 0.9, 0.95, 0.99]  # 0.99 needs 99 rows per class: most fall back
    for seed in range(20):
        cal_p, cal_y, test_p, _ = split(seed, 500, 300)
        state = C.fit_conformal(cal_p, cal_y, levels)
        for method, variant in COMBOS:
            table = state.thresholds[method][variant]
            assert np.all(np.diff(table, axis=0) >= 0), (seed, method, variant)
            masks = [C.set_mask(test_p, state, v, method, variant) for v in levels]
            for lower, higher in itertools.pairwise(masks):
                assert not np.any(lower & ~higher), (seed, method, variant)


def test_mondrian_keeps_nesting_when_a_class_falls_back_at_the_higher_level() -> None:
    """Class 0 has 12 rows (enough for 0.90, not 0.95) with bad scores: its own 0.90
    threshold exceeds the marginal 0.95 one, so 0.95 keeps the 0.90 value (running max)."""
    probs, labels = synthetic(5, 600, 4, scale=0.5)
    labels[labels == 0] = 1
    labels[:12] = 0
    probs[:12] = [0.01, 0.33, 0.33, 0.33]
    state = C.fit_conformal(probs, labels, LEVELS)
    assert state.fallback == ((), (0,))
    table = state.thresholds["lac"]["mondrian"]
    marginal = state.thresholds["lac"]["marginal"][:, 0]
    assert table[0, 0] == pytest.approx(0.99) and marginal[1] < table[0, 0]
    assert table[1, 0] == table[0, 0]
    np.testing.assert_array_equal(
        table[1, 1:], C.fit_conformal(probs, labels, [0.95]).thresholds["lac"]["mondrian"][0, 1:]
    )


def test_mondrian_falls_back_to_the_marginal_threshold_for_rare_classes() -> None:
    probs, labels = synthetic(7, 400, 5)
    labels[np.isin(labels, [2, 4])] = 1
    labels[:10] = 4  # 10 rows: enough at 0.90 (9), not at 0.95 (19)
    labels[10:13] = 2  # 3 rows: too few at both levels
    state = C.fit_conformal(probs, labels, LEVELS)
    assert state.class_counts[2] == 3 and state.class_counts[4] == 10
    assert state.fallback == ((2,), (2, 4))
    for method in C.METHODS:
        table, marginal = state.thresholds[method]["mondrian"], state.thresholds[method]["marginal"]
        assert table[0, 2] == marginal[0, 0]
        assert table[1, 2] == max(marginal[1, 0], table[0, 2])
        assert table[1, 4] == max(marginal[1, 0], table[0, 4])
        own = C.class_scores(probs, method)[:10, 4]
        assert table[0, 4] == C.conformal_quantile(own, 0.9)


def test_too_few_rows_gives_every_class() -> None:
    probs, labels = synthetic(2, 15, 3)  # 15 < 19 rows: no finite 0.95 threshold
    state = C.fit_conformal(probs, labels, LEVELS)
    for method, variant in COMBOS:
        assert C.set_mask(probs, state, 0.95, method, variant).all()
    assert state.fallback[1] == (0, 1, 2)
    assert state.to_dict()["thresholds"]["aps"]["marginal"][1] is None


# --- state and errors --------------------------------------------------------------------


def test_state_round_trips_through_json() -> None:
    cal_p, cal_y, test_p, _ = split(11, 200, 100)
    state = C.fit_conformal(cal_p, cal_y, [0.95, 0.9, 0.99])  # stored sorted
    data = json.loads(json.dumps(state.to_dict(), allow_nan=False))
    assert data == state.to_dict()
    assert data["levels"] == [0.9, 0.95, 0.99] and data["n"] == 200
    assert set(data["thresholds"]) == {"lac", "aps"}
    assert len(data["thresholds"]["lac"]["mondrian"]) == 3
    assert len(data["thresholds"]["lac"]["mondrian"][0]) == 10
    again = C.ConformalState.from_dict(data)
    assert again.to_dict() == data
    for method, variant in COMBOS:
        for level in again.levels:
            np.testing.assert_array_equal(
                C.set_mask(test_p, state, level, method, variant),
                C.set_mask(test_p, again, level, method, variant),
            )


def _broken(edit: str) -> dict:
    state = C.fit_conformal(*split(0, 200, 1)[:2], LEVELS).to_dict()
    if edit == "missing":
        del state["fallback"]
    elif edit == "levels":
        state["levels"] = [0.95, 0.9]
    elif edit == "level_range":
        state["levels"] = [0.9, 1.5]
    elif edit == "n":
        state["n"] = 7
    elif edit == "method":
        del state["thresholds"]["aps"]
    elif edit == "length":
        state["thresholds"]["lac"]["mondrian"][0].pop()
    elif edit == "decreasing":
        state["thresholds"]["aps"]["marginal"] = [0.9, 0.1]
    elif edit == "type":
        state["thresholds"]["lac"]["marginal"] = ["0.5", 0.6]
    elif edit == "fallback":
        state["fallback"] = [[], [99]]
    return state


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        ("missing", "'fallback'"),
        ("levels", "'levels'"),
        ("level_range", "levels"),
        ("n", "'n'"),
        ("method", "'thresholds'"),
        ("length", "'thresholds.lac.mondrian'"),
        ("decreasing", "'thresholds.aps.marginal'"),
        ("type", "'thresholds.lac.marginal'"),
        ("fallback", "'fallback'"),
    ],
)
def test_state_validation_names_the_key_in_one_line(edit: str, key: str) -> None:
    with pytest.raises(ValueError) as info:
        C.ConformalState.from_dict(_broken(edit))
    assert key in str(info.value) and "\n" not in str(info.value)


def test_level_errors_are_one_line() -> None:
    cal_p, cal_y, test_p, _ = split(1, 200, 5)
    state = C.fit_conformal(cal_p, cal_y, LEVELS)
    with pytest.raises(
        ValueError, match=r"^level 0.8 was not fitted \(fitted levels: 0.9, 0.95\)$"
    ):
        C.prediction_sets(test_p, state, 0.8, "lac", "marginal")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"^level must lie in \(0, 1\)"):
            C.set_mask(test_p, state, bad, "aps", "marginal")
    with pytest.raises(ValueError, match=r"^set_level must be a number in \(0, 1\)"):
        C.check_level("high", key="set_level")
    with pytest.raises(ValueError, match=r"^set_level must lie in \(0, 1\), got 95"):
        C.check_level(95, key="set_level")
    with pytest.raises(ValueError, match="variant must be one of"):
        C.set_mask(test_p, state, 0.9, "lac", "classwise")
    with pytest.raises(ValueError, match="expected 10 classes"):
        C.set_mask(test_p[:, :4], state, 0.9, "lac", "marginal")
    assert C.set_mask(test_p, state, 0.9 + 1e-12, "lac", "marginal").shape == test_p.shape
    with pytest.raises(ValueError, match="distinct"):
        C.fit_conformal(cal_p, cal_y, [0.9, 0.9])


# --- cross-fitting -----------------------------------------------------------------------


def test_stratified_folds_are_balanced_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [50, 23, 7, 1])
    folds = C.stratified_folds(labels, 5, seed=3)
    np.testing.assert_array_equal(folds, C.stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, C.stratified_folds(labels, 5, seed=4))
    assert np.ptp(np.bincount(folds, minlength=5)) <= 1
    for c in range(4):
        assert np.ptp(np.bincount(folds[labels == c], minlength=5)) <= 1
    with pytest.raises(ValueError, match="folds must lie in"):
        C.stratified_folds(labels, 1, seed=0)


def test_cross_fit_never_uses_a_rows_own_fold() -> None:
    _, labels = synthetic(4, 300, 6)
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def fit_predict(train: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        calls.append((train, held_out))
        freq = np.bincount(labels[train], minlength=6) / train.size  # a "model" of train
        return np.tile(freq, (held_out.size, 1))

    out = C.cross_fit(labels, fit_predict, folds=5, seed=0)
    folds = C.stratified_folds(labels, 5, seed=0)
    assert len(calls) == 5
    held = np.concatenate([h for _, h in calls])
    np.testing.assert_array_equal(np.sort(held), np.arange(300))  # each row once
    for train, held_out in calls:
        assert not np.intersect1d(train, held_out).size
        assert np.union1d(train, held_out).size == 300
        assert len(np.unique(folds[held_out])) == 1 and folds[held_out[0]] not in folds[train]
    for i in (0, 137, 299):  # row i's probabilities come from the rows outside its fold
        outside = labels[folds != folds[i]]
        np.testing.assert_allclose(out[i], np.bincount(outside, minlength=6) / outside.size)
    state = C.fit_conformal(out, labels, LEVELS)
    assert state.n == 300


def test_cross_fit_checks_what_fit_predict_returns() -> None:
    labels = np.arange(20) % 2
    with pytest.raises(ValueError, match="returned 1 rows"):
        C.cross_fit(labels, lambda tr, ho: np.full((1, 2), 0.5), folds=2, seed=0)


# --- evaluation helpers ------------------------------------------------------------------


def test_set_summary_by_hand() -> None:
    mask = np.array(
        [
            [True, False, False],  # label 0: covered, singleton
            [True, True, False],  # label 1: covered
            [False, False, False],  # label 1: empty, missed
            [False, True, True],  # label 0: missed
        ]
    )
    labels = np.array([0, 1, 1, 0])
    summary = CM.set_summary(mask, labels, n_boot=200, seed=0)
    assert summary["coverage"] == 0.5
    assert summary["mean_set_size"] == 1.25 and summary["median_set_size"] == 1.5
    assert summary["singleton_share"] == 0.25 and summary["empty_share"] == 0.25
    assert summary["class_coverage"] == [0.5, 0.5, None]
    assert summary["worst_class"] == 0 and summary["worst_class_coverage"] == 0.5
    assert 0.0 <= summary["coverage_ci_low"] <= 0.5 <= summary["coverage_ci_high"] <= 1.0
    json.dumps(summary, allow_nan=False)


def test_coverage_ci_is_seeded_and_brackets_the_coverage() -> None:
    cal_p, cal_y, test_p, test_y = split(8, 500, 2000)
    mask = C.set_mask(test_p, C.fit_conformal(cal_p, cal_y, LEVELS), 0.9, "aps", "marginal")
    low, high = CM.coverage_ci(mask, test_y, n_boot=500, seed=1)
    assert (low, high) == CM.coverage_ci(mask, test_y, n_boot=500, seed=1)
    assert low < CM.coverage(mask, test_y) < high
    half = 1.96 * math.sqrt(0.9 * 0.1 / 2000)  # the normal-approximation half-width
    assert high - low == pytest.approx(2 * half, rel=0.2)


# --- cross-check against MAPIE -----------------------------------------------------------


class _PassThrough(ClassifierMixin, BaseEstimator):
    """A prefit classifier whose features are already the probabilities."""

    def __init__(self, k: int = 10) -> None:
        self.k = k

    def fit(self, x: np.ndarray, y: np.ndarray) -> _PassThrough:
        self.classes_ = np.arange(self.k)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmax(x, axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lac_matches_mapie(seed: int) -> None:
    mapie = pytest.importorskip("mapie.classification")
    cal_p, cal_y, test_p, _ = split(seed, 500, 1000)
    state = C.fit_conformal(cal_p, cal_y, LEVELS)
    model = mapie.SplitConformalClassifier(
        estimator=_PassThrough(10).fit(cal_p, cal_y),
        confidence_level=list(LEVELS),
        conformity_score="lac",
        prefit=True,
    )
    model.conformalize(cal_p, cal_y)
    _, sets = model.predict_set(test_p)
    quantiles = model._mapie_classifier.quantiles_  # set by predict_set
    np.testing.assert_array_equal(quantiles, state.thresholds["lac"]["marginal"][:, 0])
    for i, level in enumerate(LEVELS):
        np.testing.assert_array_equal(
            sets[:, :, i], C.set_mask(test_p, state, level, "lac", "marginal")
        )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aps_matches_mapie(seed: int) -> None:
    """MAPIE calibrates APS with randomised scores only, so its non-randomised pieces are
    checked: the true-label score, the quantile, and the sets without the label that
    crosses the threshold (``include_last_label=False``). MAPIE never returns an empty
    set there (it keeps the top class), so rows empty here must be its top class alone."""
    sets_module = pytest.importorskip("mapie.conformity_scores")
    utils = pytest.importorskip("mapie.utils")
    cal_p, cal_y, test_p, _ = split(seed, 500, 1000)
    state = C.fit_conformal(cal_p, cal_y, LEVELS)
    aps = sets_module.APSConformityScore()
    mapie_scores, _ = aps.get_true_label_cumsum_proba(cal_y, cal_p, np.arange(10))
    ours = C.class_scores(cal_p, "aps")[np.arange(500), cal_y]
    np.testing.assert_allclose(mapie_scores.ravel(), ours, rtol=0, atol=1e-12)
    alphas = 1 - np.array(LEVELS)
    quantiles = utils._compute_classification_quantile(ours.reshape(-1, 1), alphas)
    np.testing.assert_array_equal(quantiles, state.thresholds["aps"]["marginal"][:, 0])
    aps.quantiles_ = quantiles
    mapie_sets = aps.get_prediction_sets(
        np.repeat(test_p[:, :, None], 2, axis=2), ours, alphas, "prefit", include_last_label=False
    )
    for i, level in enumerate(LEVELS):
        mask = C.set_mask(test_p, state, level, "aps", "marginal")
        empty = ~mask.any(axis=1)
        np.testing.assert_array_equal(mapie_sets[~empty, :, i], mask[~empty])
        top_only = np.eye(10, dtype=bool)[test_p[empty].argmax(axis=1)]
        np.testing.assert_array_equal(mapie_sets[empty, :, i], top_only)
