"""Configuration validation and evaluation metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fanomad_stream.config import load_config, parse_config
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.metrics import best_f1, evaluate_scores, point_adjust, precision_at_k

REPO = Path(__file__).resolve().parents[2]


def test_demo_config_loads() -> None:
    """The shipped demo config is valid and names four machines."""
    config = load_config(REPO / "configs" / "demo.yaml")
    assert len(config.replay.machines) == 4


def test_unknown_key_rejected_with_path() -> None:
    """A misspelt key fails with its dotted path."""
    with pytest.raises(ConfigError, match=r"edge\.window_event: Extra inputs are not permitted"):
        parse_config({"edge": {"window_event": 10}})


def test_out_of_range_value_rejected() -> None:
    """A value outside its range fails with the path, the bound and the value."""
    with pytest.raises(ConfigError, match=r"edge\.threshold\.quantile: .*less than 1.*got 1.5"):
        parse_config({"edge": {"threshold": {"quantile": 1.5}}})


def test_sasl_without_credentials_rejected() -> None:
    """SASL without a mechanism and credentials is rejected at load time."""
    with pytest.raises(ConfigError, match="needs sasl_mechanism"):
        parse_config({"kafka": {"security_protocol": "SASL_PLAINTEXT"}})


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_point_adjust_fills_detected_segments() -> None:
    """One hit inside a true segment marks the whole segment; missed segments stay missed."""
    labels = np.array([0, 1, 1, 1, 0, 1, 1, 0])
    decisions = np.array([0, 0, 1, 0, 0, 0, 0, 1], dtype=bool)
    np.testing.assert_array_equal(point_adjust(labels, decisions), [0, 1, 1, 1, 0, 0, 0, 1])


def test_metrics_on_known_series() -> None:
    """AUROC, best F1, P@K and the confusion matrix of a hand-built series."""
    labels = np.array([0, 0, 0, 1, 1, 0])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.32, 0.35])
    decisions = scores > 0.5
    m = evaluate_scores(labels, scores, decisions, ks=(2,))
    # Positives 0.9 and 0.32 against negatives 0.1, 0.2, 0.3, 0.35: 7 of 8 pairs ordered.
    assert m.auroc == pytest.approx(7 / 8)
    assert best_f1(labels, scores) == pytest.approx(0.8)  # threshold 0.32: P=2/3, R=1
    assert precision_at_k(labels, scores, 2) == pytest.approx(0.5)
    assert m.confusion == {"tp": 1, "fp": 0, "fn": 1, "tn": 4}
    assert m.f1_operating == pytest.approx(2 / 3)
