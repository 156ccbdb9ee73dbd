"""Calibrators: known-temperature recovery, valid probabilities, persistence, auto selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from pipeline import calibration as C
from pipeline import metrics as M
from pipeline.calibration import scaling
from pipeline.errors import PipelineError

ALL_METHODS = ["none", *C.METHODS]


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """Draw one label per row from the row's distribution (inverse CDF)."""
    u = rng.random(len(probs))[:, None]
    return np.minimum((u > np.cumsum(probs, axis=1)).sum(axis=1), probs.shape[1] - 1)


def synthetic(
    t_true: float, n: int = 4000, k: int = 10, seed: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Logits with a clear signal, and labels drawn from softmax(z / t_true).

    With ``t_true > 1`` the raw softmax is overconfident: the situation calibration fixes.
    """
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    z[np.arange(n), rng.integers(0, k, n)] += 4.0
    return z, sample_labels(rng, C.softmax(z / t_true))


@pytest.fixture(scope="module")
def overconfident() -> tuple[np.ndarray, np.ndarray]:
    return synthetic(2.0)


def assert_valid(probs: np.ndarray, shape: tuple[int, int]) -> None:
    assert probs.shape == shape
    assert np.all(np.isfinite(probs))
    assert probs.min() >= 0.0
    assert probs.max() <= 1.0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.0, 3.0])
def test_temperature_recovers_known_temperature(t_true: float) -> None:
    z, y = synthetic(t_true)
    cal = C.fit_calibrator("temperature", z, y, seed=0)
    assert isinstance(cal, C.TemperatureScaling)
    assert cal.temperature == pytest.approx(t_true, rel=0.1)


def test_temperature_never_changes_the_argmax(overconfident: tuple) -> None:
    z, y = overconfident
    cal = C.fit_calibrator("temperature", z, y, seed=0)
    assert cal.temperature > 1.5  # an actual change, not the identity
    rng = np.random.default_rng(9)
    fresh = rng.normal(size=(5000, 10)) * rng.uniform(0.01, 30, size=(5000, 1))
    for logits in (z, fresh):
        probs = cal.predict_proba(logits)
        assert np.array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
        assert not np.allclose(probs, C.softmax(logits))
    assert M.accuracy(cal.predict_proba(z), y) == M.accuracy(C.softmax(z), y)


@pytest.mark.parametrize("method", ALL_METHODS)
def test_valid_probabilities_and_lower_held_out_nll(method: str, overconfident: tuple) -> None:
    z, y = overconfident
    fit, held = slice(0, 2000), slice(2000, None)
    cal = C.fit_calibrator(method, z[fit], y[fit], seed=0)
    probs = cal.predict_proba(z[held])
    assert_valid(probs, z[held].shape)
    extreme = np.array([[1e4, -1e4, *[0.0] * 8], [0.0] * 10, [-800.0] * 9 + [800.0]])
    assert_valid(cal.predict_proba(extreme), extreme.shape)
    raw_nll = M.nll(C.softmax(z[held]), y[held])
    if method == "none":
        assert M.nll(probs, y[held]) == pytest.approx(raw_nll)
    else:
        # raw NLL is about 2.29 here; every method brings it to about 1.9-2.0
        assert M.nll(probs, y[held]) < raw_nll - 0.2, method
        assert M.ece(probs, y[held]) < M.ece(C.softmax(z[held]), y[held]) / 2, method


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_checks_its_inputs_before_fitting(method: str, overconfident: tuple) -> None:
    z, y = overconfident
    with pytest.raises(ValueError, match=r"logits must have shape \(n>0, k>=2\)"):
        C.fit_calibrator(method, z[:, :1], y, seed=0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        C.fit_calibrator(method, np.where(np.arange(z.shape[1]) == 3, np.nan, z), y, seed=0)
    with pytest.raises(ValueError, match=f"labels must be {len(y)} integers"):
        C.fit_calibrator(method, z, y[:-1], seed=0)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        C.fit_calibrator(method, z, np.where(y == 0, 10, y), seed=0)
    calibrator = C.fit_calibrator(method, z.astype(np.float32).tolist(), y.tolist(), seed=0)
    assert calibrator.method == method and calibrator.num_classes == z.shape[1]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_json_round_trip_gives_identical_predictions(method: str, overconfident: tuple) -> None:
    z, y = overconfident
    cal = C.fit_calibrator(method, z[:1000], y[:1000], seed=0)
    state = json.loads(json.dumps(cal.to_dict()))
    assert state["method"] == method
    assert state["num_classes"] == 10
    again = C.Calibrator.from_dict(state)
    assert type(again) is type(cal)
    assert np.array_equal(again.predict_proba(z), cal.predict_proba(z))
    assert again.to_dict() == state


def test_vector_and_matrix_regularisation_pulls_toward_identity(overconfident: tuple) -> None:
    z, y = overconfident
    for method in ("vector", "matrix"):
        free = C.fit_calibrator(method, z, y, seed=0, reg=0.0)
        tied = C.fit_calibrator(method, z, y, seed=0, reg=1e6)
        assert np.allclose(tied.predict_proba(z), C.softmax(z), atol=1e-4), method
        assert not np.allclose(free.predict_proba(z), C.softmax(z), atol=1e-2), method
    assert isinstance(free, C.MatrixScaling)
    np.testing.assert_allclose(free.predict_proba(z), C.softmax(z @ free.weight.T + free.bias))


def test_vector_scaling_recovers_per_class_scale_and_bias() -> None:
    rng = np.random.default_rng(5)
    n, k = 6000, 4
    z = rng.normal(size=(n, k)) * 2
    w_true, b_true = np.array([0.5, 1.0, 1.5, 2.0]), np.array([0.5, -0.5, 0.0, 0.3])
    y = sample_labels(rng, C.softmax(z * w_true + b_true))
    cal = C.fit_calibrator("vector", z, y, seed=0, reg=0.0)
    assert isinstance(cal, C.VectorScaling)
    np.testing.assert_allclose(cal.weight, w_true, atol=0.15)
    # biases are identified only up to a common shift
    np.testing.assert_allclose(cal.bias - cal.bias.mean(), b_true - b_true.mean(), atol=0.15)
    np.testing.assert_allclose(cal.predict_proba(z), C.softmax(z * w_true + b_true), atol=0.06)


def test_histogram_binning_hand_case() -> None:
    # Two classes, logits (0, s): p1 = sigmoid(s). With 2 bins, p1 in [0, .5) or [.5, 1].
    # Rows with p1 ~ 0.73, 0.88 (bin 1) labelled 1, 0 -> class-1 value 1/2 in bin 1;
    # class 0 has p0 ~ 0.27, 0.12 in bin 0 with labels 0, 1 -> value 1/2. Bin 1 of class 0
    # and bin 0 of class 1 are empty and keep their midpoints 0.75 and 0.25.
    logits = np.array([[0.0, 1.0], [0.0, 2.0]])
    cal = C.fit_calibrator("histogram", logits, np.array([1, 0]), seed=0, n_bins=2)
    assert isinstance(cal, C.HistogramBinning)
    np.testing.assert_allclose(cal.values, [[0.5, 0.75], [0.25, 0.5]])
    # Any row with p1 >= .5 scores (0.5, 0.5) -> renormalised (0.5, 0.5).
    np.testing.assert_allclose(cal.predict_proba(np.array([[0.0, 3.0]])), [[0.5, 0.5]])
    # p1 < .5 scores (p0 in bin 1 -> 0.75, p1 in bin 0 -> 0.25).
    np.testing.assert_allclose(cal.predict_proba(np.array([[3.0, 0.0]])), [[0.75, 0.25]])


def test_isotonic_steps_match_sklearn(overconfident: tuple) -> None:
    z, y = overconfident
    cal = C.fit_calibrator("isotonic", z[:2000], y[:2000], seed=0)
    assert isinstance(cal, C.IsotonicCalibration)
    probs_fit, probs_new = C.softmax(z[:2000]), C.softmax(z[2000:])
    scores = np.empty_like(probs_new)
    for j in range(10):
        iso = IsotonicRegression(y_min=0, y_max=1, out_of_bounds="clip")
        iso.fit(probs_fit[:, j], y[:2000] == j)
        scores[:, j] = iso.predict(probs_new[:, j])
        ours = np.interp(probs_new[:, j], cal.x[j], cal.y[j])
        np.testing.assert_allclose(ours, scores[:, j], atol=1e-12)
    # then floored at eps and renormalised (no row of this data scores all zeros)
    floored = np.maximum(scores, cal.eps)
    expected = floored / floored.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(cal.predict_proba(z[2000:]), expected, atol=1e-12)


def test_rows_that_score_zero_fall_back_to_the_model() -> None:
    """If every class of a row maps to 0, the row keeps its softmax instead of 0/0."""
    k = 3
    flat = C.IsotonicCalibration(
        k, [np.array([0.0, 1.0])] * k, [np.array([0.0, 0.0])] * k, eps=1e-9
    )
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 0.0, 5.0]])
    probs = flat.predict_proba(logits)
    assert_valid(probs, logits.shape)
    np.testing.assert_allclose(probs, C.softmax(logits), atol=1e-8)


def test_auto_selection_picks_the_method_that_fits() -> None:
    z, y = synthetic(2.0, n=2000)
    name, table = C.select_auto(z, y, methods=["none", "temperature"], folds=3, seed=0)
    assert name == "temperature"
    assert set(table) == {"none", "temperature"}
    assert len(table["temperature"]["fold_nll"]) == 3
    assert table["temperature"]["mean_nll"] < table["none"]["mean_nll"] - 0.2
    assert table["temperature"]["mean_nll"] == pytest.approx(
        np.mean(table["temperature"]["fold_nll"])
    )
    # Per-class scales and biases that one temperature cannot express: vector wins.
    rng = np.random.default_rng(6)
    z = rng.normal(size=(3000, 4)) * 2
    y = sample_labels(rng, C.softmax(z * np.array([0.3, 1.0, 2.0, 3.0]) + [1.0, 0, -1.0, 0]))
    name, table = C.select_auto(z, y, methods=["temperature", "vector"], folds=3, seed=0)
    assert name == "vector"
    assert table["vector"]["mean_nll"] < table["temperature"]["mean_nll"]


def test_auto_selection_is_deterministic_and_uses_all_methods(overconfident: tuple) -> None:
    z, y = overconfident
    z, y = z[:1500], y[:1500]
    first = C.select_auto(z, y, folds=3, seed=0)
    assert first == C.select_auto(z, y, folds=3, seed=0)
    name, table = first
    assert list(table) == list(C.METHODS)
    assert name == min(table, key=lambda m: table[m]["mean_nll"])


def test_bad_methods_options_and_state_are_pipeline_errors(overconfident: tuple) -> None:
    z, y = overconfident
    with pytest.raises(PipelineError, match="unknown calibration method 'platt'"):
        C.fit_calibrator("platt", z, y, seed=0)
    with pytest.raises(PipelineError, match="bad options"):
        C.fit_calibrator("temperature", z, y, seed=0, n_bins=3)
    with pytest.raises(PipelineError, match="unknown calibration methods"):
        C.select_auto(z, y, methods=["temperature", "platt"])
    with pytest.raises(PipelineError, match="folds=1"):
        C.select_auto(z, y, folds=1)
    with pytest.raises(PipelineError, match="unknown method"):
        C.Calibrator.from_dict({"method": "platt", "num_classes": 10})
    with pytest.raises(PipelineError, match=r"temperature=-1\.0"):
        C.Calibrator.from_dict({"method": "temperature", "num_classes": 10, "temperature": -1.0})
    with pytest.raises(PipelineError, match="'bias'"):
        C.Calibrator.from_dict({"method": "vector", "num_classes": 3, "weight": [1, 1, 1]})
    with pytest.raises(PipelineError, match="shape"):
        C.Calibrator.from_dict(
            {"method": "vector", "num_classes": 3, "weight": [1, 1], "bias": [0, 0, 0]}
        )
    cal = C.fit_calibrator("temperature", z, y, seed=0)
    with pytest.raises(ValueError, match="expected 10 classes"):
        cal.predict_proba(z[:, :5])


def varied_logits(n: int, k: int, seed: int) -> tuple[np.random.Generator, np.ndarray]:
    """Logits whose scale varies by row (0.5x to 8x), so flattening by a temperature and
    mixing in the uniform distribution leave different traces and can be told apart."""
    rng = np.random.default_rng(seed)
    return rng, rng.normal(size=(n, k)) * rng.uniform(0.5, 8.0, size=(n, 1))


def test_ets_recovers_known_temperature_and_weights() -> None:
    rng, z = varied_logits(10000, 10, seed=0)
    true = C.EnsembleTemperatureScaling(10, 2.5, np.array([0.6, 0.3, 0.1]))
    y = sample_labels(rng, true.predict_proba(z))
    cal = C.fit_calibrator("ets", z, y, seed=0)
    assert isinstance(cal, C.EnsembleTemperatureScaling)
    assert cal.temperature == pytest.approx(2.5, rel=0.1)
    np.testing.assert_allclose(cal.weights, [0.6, 0.3, 0.1], atol=0.05)
    np.testing.assert_allclose(cal.predict_proba(z), true.predict_proba(z), atol=0.02)


def test_temperature_platt_recovers_known_parameters() -> None:
    rng, z = varied_logits(10000, 10, seed=3)
    true = C.TemperaturePlatt(10, 2.0, 0.7, -0.3)
    y = sample_labels(rng, true.predict_proba(z))
    cal = C.fit_calibrator("temperature_platt", z, y, seed=0)
    assert isinstance(cal, C.TemperaturePlatt)
    assert cal.temperature == pytest.approx(2.0, rel=0.1)
    assert cal.slope == pytest.approx(0.7, abs=0.05)
    assert cal.intercept == pytest.approx(-0.3, abs=0.1)
    np.testing.assert_allclose(cal.predict_proba(z), true.predict_proba(z), atol=0.02)


def test_temperature_platt_is_a_top_label_map() -> None:
    """The top label gets sigmoid(a s + b); the others keep their tempered proportions."""
    z = np.array([[2.0, 0.5, -1.0, 0.0], [-3.0, 1.0, 4.0, 3.5]])
    cal = C.TemperaturePlatt(4, 2.0, 0.8, -0.2)
    probs = cal.predict_proba(z)
    tempered = C.softmax(z / 2.0)
    for row, top in enumerate(z.argmax(axis=1)):
        p = tempered[row, top]
        expected = 1 / (1 + np.exp(-(0.8 * np.log(p / (1 - p)) - 0.2)))
        assert probs[row, top] == pytest.approx(expected, rel=1e-12)
        others = np.delete(np.arange(4), top)
        np.testing.assert_allclose(
            probs[row, others] / probs[row, others].sum(),
            tempered[row, others] / tempered[row, others].sum(),
            rtol=1e-12,
        )


@pytest.mark.parametrize(
    "cal",
    [
        C.EnsembleTemperatureScaling(10, 3.0, np.array([0.2, 0.1, 0.7])),
        C.TemperaturePlatt(10, 1.5, 0.3, -3.0),  # pulls the top label far down
        C.TemperaturePlatt(10, 0.5, 5.0, 2.0),
    ],
    ids=["ets", "platt-down", "platt-up"],
)
def test_new_methods_never_change_the_argmax(cal: C.Calibrator) -> None:
    _, z = varied_logits(5000, 10, seed=4)
    ties = np.zeros((3, 10))
    ties[0, [3, 7]] = 5.0  # a tie: argmax picks the first, and must keep it
    ties[1, [0, 1]] = [1.0, 1.0 - 1e-12]
    ties[2] = 1e4 * np.arange(10)
    for logits in (z, ties, z[:, :10] * 1e-3):
        probs = cal.predict_proba(logits)
        assert_valid(probs, logits.shape)
        assert np.array_equal(probs.argmax(axis=1), logits.argmax(axis=1))
    if isinstance(cal, C.TemperaturePlatt) and cal.intercept < 0:
        # Without the runner-up floor the plain Platt map would flip many rows here.
        _, s, _, rest = scaling._top_label_parts(z / cal.temperature)
        plain = 1 / (1 + np.exp(-(cal.slope * s + cal.intercept)))
        runner_up = rest.max(axis=1) * (1 - plain)
        assert np.mean(runner_up > plain) > 0.1


def test_new_methods_state_is_checked() -> None:
    with pytest.raises(PipelineError, match="'weights' must be >= 0 and sum to 1"):
        C.Calibrator.from_dict(
            {"method": "ets", "num_classes": 3, "temperature": 1.0, "weights": [0.5, 0.6, -0.1]}
        )
    with pytest.raises(PipelineError, match="slope=0.0 must be > 0"):
        C.Calibrator.from_dict(
            {
                "method": "temperature_platt",
                "num_classes": 3,
                "temperature": 1.0,
                "slope": 0.0,
                "intercept": 0.0,
            }
        )
