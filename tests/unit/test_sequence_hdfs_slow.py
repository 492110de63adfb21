"""Sequence autoencoder on DeepLog's HDFS block sessions (slow: trains on real sessions)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fanomad_stream.detect.sequence import LSTMAutoencoderDetector, sliding_windows
from fanomad_stream.evaluate.logs import evaluate_sessions
from fanomad_stream.replay.logs import read_hdfs_sessions, split_sessions

SESSIONS = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "loghub"
    / "HDFS_sessions_deeplog"
)
WINDOW = 10
KEYS = 30  # DeepLog's log keys are 1-28; the last column takes any larger key


def one_hot(keys: tuple[int, ...]) -> np.ndarray:
    rows = np.zeros((len(keys), KEYS), dtype=np.float32)
    rows[np.arange(len(keys)), np.minimum(keys, KEYS - 1)] = 1.0
    return rows


@pytest.mark.slow
@pytest.mark.skipif(not SESSIONS.is_dir(), reason=f"DeepLog HDFS sessions not found at {SESSIONS}")
def test_lstm_separates_hdfs_sessions() -> None:
    """Trained on earlier normal sessions, the LSTM ranks anomalous ones above later normal ones."""
    torch.set_num_threads(2)
    train, test = split_sessions(
        read_hdfs_sessions(SESSIONS, max_normal=1300, max_abnormal=300), 1000 / 1300
    )
    detector = LSTMAutoencoderDetector(
        KEYS, window=WINDOW, hidden=32, latent=8, local_epochs=3, learning_rate=3e-3, train_stride=2
    )
    detector.train(np.concatenate([sliding_windows(one_hot(s.keys), WINDOW, 2) for s in train]))

    # Every full window (or the whole session, when shorter) scores its last event, so the
    # short warm-up windows do not enter the session score.
    ids, scores = [], []
    for index, session in enumerate(test):
        errors = detector.step_errors(sliding_windows(one_hot(session.keys), WINDOW))[:, -1]
        ids += [index] * len(errors)
        scores.append(errors)
    labels = {index: session.label for index, session in enumerate(test)}
    metrics = evaluate_sessions(
        np.array(ids), labels, np.concatenate(scores), np.zeros(len(ids), dtype=bool), "mean"
    )
    assert metrics.auroc > 0.8, f"session AUROC {metrics.auroc:.3f}"
