from __future__ import annotations

import math

import numpy as np
import pytest

from fanomad_stream.detect.spot import SpotThreshold, fit_gpd, gpd_quantile


def test_fit_gpd_recovers_exponential_tail() -> None:
    peaks = np.random.default_rng(0).exponential(2.0, size=20000)
    gamma, sigma = fit_gpd(peaks)
    assert abs(gamma) < 0.05
    assert sigma == pytest.approx(2.0, rel=0.05)


def test_fit_gpd_constant_peaks_falls_back() -> None:
    gamma, sigma = fit_gpd(np.full(20, 0.5))
    assert gamma == 0.0
    assert sigma == pytest.approx(0.5)


def test_gpd_quantile_exponential_case() -> None:
    # With gamma 0 and sigma 1 over level 0, P(X > z) = exp(-z) when every score is a peak.
    assert gpd_quantile(0.0, 0.0, 1.0, risk=1e-3, n=100, n_peaks=100) == pytest.approx(
        math.log(1000)
    )


def test_spot_is_infinite_during_warmup() -> None:
    spot = SpotThreshold(warmup_events=500)
    thresholds = spot.thresholds_for(np.random.default_rng(1).exponential(size=499))
    assert np.all(np.isinf(thresholds))
    assert math.isinf(spot.current)


def test_spot_matches_exponential_quantile() -> None:
    rng = np.random.default_rng(2)
    spot = SpotThreshold(risk=1e-3, warmup_events=2000)
    for _ in range(40):
        spot.thresholds_for(rng.exponential(size=500))
    # The 1 - 1e-3 quantile of Exp(1) is log(1000) = 6.91. Leaving alerts out of the fit
    # truncates the tail, so SPOT lands about 13 % low; 0.8 bounds that known bias.
    assert 0.8 * math.log(1000) < spot.current < 1.05 * math.log(1000)


def test_spot_alert_rate_near_risk() -> None:
    rng = np.random.default_rng(3)
    spot = SpotThreshold(risk=1e-2, warmup_events=2000)
    spot.learn(rng.normal(size=2000))
    scores = rng.normal(size=20000)
    alerts = 0
    for begin in range(0, scores.shape[0], 1000):
        batch = scores[begin : begin + 1000]
        alerts += int(np.sum(batch > spot.thresholds_for(batch)))
    assert 0.005 < alerts / scores.shape[0] < 0.03


def test_spot_threshold_ignores_own_batch() -> None:
    rng = np.random.default_rng(4)
    history = rng.exponential(size=3000)
    quiet, loud = SpotThreshold(), SpotThreshold()
    quiet.learn(history)
    loud.learn(history)
    batch = rng.exponential(size=100)
    assert np.array_equal(quiet.thresholds_for(batch), loud.thresholds_for(batch * 50))


def test_spot_alerts_do_not_become_peaks() -> None:
    rng = np.random.default_rng(5)
    spot = SpotThreshold(warmup_events=2000)
    spot.learn(rng.exponential(size=2000))
    before = spot.current
    spot.learn(np.full(100, 1e6))
    assert spot.current == pytest.approx(before, rel=0.05)


def test_dspot_follows_slow_drift() -> None:
    rng = np.random.default_rng(6)
    spot = SpotThreshold(warmup_events=2000, depth=50)
    plain = SpotThreshold(warmup_events=2000)
    drift = np.linspace(0.0, 10.0, 8000)
    for begin in range(0, 8000, 1000):
        scores = drift[begin : begin + 1000] + rng.exponential(size=1000)
        spot.learn(scores)
        plain.learn(scores)
    shifted = 10.0 + rng.exponential(size=1000)
    assert np.mean(shifted > spot.current) < 0.01
    assert np.mean(shifted > plain.current) > 0.5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"risk": 0.0}, "risk"),
        ({"init_quantile": 0.4}, "init_quantile"),
        ({"warmup_events": 10}, "warmup_events"),
        ({"depth": -1}, "depth"),
        ({"warmup_events": 100, "init_quantile": 0.95}, "calibration peaks"),
        ({"median_cap": 0.0}, "median_cap"),
        ({"median_cap": float("inf")}, "median_cap"),
    ],
)
def test_spot_rejects_invalid_parameters(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpotThreshold(**kwargs)  # type: ignore[arg-type]


def _heavy_calibration(rng: np.random.Generator) -> np.ndarray:
    """Exp(1) scores with a block of large values, like a calibration window with anomalies."""
    scores = rng.exponential(size=2000)
    scores[1000:1100] = rng.uniform(20.0, 40.0, size=100)
    return scores


def test_median_cap_bounds_the_threshold() -> None:
    rng = np.random.default_rng(5)
    calibration = _heavy_calibration(rng)
    capped = SpotThreshold(risk=1e-3, warmup_events=2000, median_cap=5.0)
    uncapped = SpotThreshold(risk=1e-3, warmup_events=2000)
    capped.learn(calibration)
    uncapped.learn(calibration)
    cap = 5.0 * float(np.median(calibration))
    assert uncapped.current > cap
    assert capped.current == pytest.approx(cap)
    stream = rng.exponential(size=300)
    assert np.all(capped.thresholds_for(stream) == pytest.approx(cap))


def test_median_cap_leaves_the_tail_model_alone() -> None:
    rng = np.random.default_rng(6)
    calibration, stream = _heavy_calibration(rng), rng.exponential(size=1000)
    capped = SpotThreshold(risk=1e-3, warmup_events=2000, median_cap=5.0)
    uncapped = SpotThreshold(risk=1e-3, warmup_events=2000)
    for spot in (capped, uncapped):
        spot.learn(calibration)
        spot.learn(stream)
    assert (capped.level, capped.gamma, capped.sigma) == (
        uncapped.level,
        uncapped.gamma,
        uncapped.sigma,
    )


def test_median_cap_below_a_light_tail_changes_nothing() -> None:
    scores = np.random.default_rng(7).exponential(size=3000)
    capped = SpotThreshold(risk=1e-3, warmup_events=2000, median_cap=1000.0)
    uncapped = SpotThreshold(risk=1e-3, warmup_events=2000)
    assert np.array_equal(capped.thresholds_for(scores), uncapped.thresholds_for(scores))
    assert capped.current == uncapped.current


def test_median_cap_is_off_for_a_zero_median() -> None:
    scores = np.zeros(2000)
    scores[-100:] = np.random.default_rng(8).exponential(size=100)
    spot = SpotThreshold(warmup_events=2000, median_cap=5.0)
    spot.learn(scores)
    assert math.isinf(spot.cap)
