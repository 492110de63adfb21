"""Loading of the Server Machine Dataset (SMD) files, with the test labels kept apart.

Each machine has a train half and a test half of 38 columns, one row per minute, stored as
gzip-compressed CSV, and one 0/1 label per test row in plain text. Labels are read only by
``load_test_labels``, so code that scores series never touches them.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MACHINES = tuple(f"machine-1-{i}" for i in range(2, 9))
N_FEATURES = 38


@dataclass(frozen=True)
class MachineSeries:
    """Unlabelled train and test halves of one machine, float64 arrays of shape (rows, 38)."""

    machine: str
    train: np.ndarray
    test: np.ndarray


def _read_csv_gz(path: Path) -> np.ndarray:
    if not path.is_file():
        msg = f"SMD file {path} not found; pass the folder that holds train/ and test/"
        raise FileNotFoundError(msg)
    with gzip.open(path, "rt") as handle:
        array = np.loadtxt(handle, delimiter=",", dtype=np.float64, ndmin=2)
    if array.shape[1] != N_FEATURES:
        msg = f"SMD file {path} has {array.shape[1]} columns, expected {N_FEATURES}"
        raise ValueError(msg)
    return array


def load_series(data_dir: Path, machine: str) -> MachineSeries:
    """Read the train and test halves of ``machine`` from ``data_dir`` (no labels)."""
    return MachineSeries(
        machine=machine,
        train=_read_csv_gz(data_dir / "train" / f"{machine}.txt.gz"),
        test=_read_csv_gz(data_dir / "test" / f"{machine}.txt.gz"),
    )


def load_test_labels(data_dir: Path, machine: str, n_rows: int) -> np.ndarray:
    """Read the 0/1 label of every test row of ``machine``; only the final metric step calls this.

    Raises ValueError when the label count differs from ``n_rows``, the test row count.
    """
    path = data_dir / "test_label" / f"{machine}.txt"
    if not path.is_file():
        msg = f"SMD label file {path} not found; pass the folder that holds test_label/"
        raise FileNotFoundError(msg)
    labels = np.loadtxt(path, dtype=np.int8, ndmin=1)
    if labels.shape != (n_rows,):
        msg = f"SMD label file {path} has {labels.shape[0]} labels for {n_rows} test rows"
        raise ValueError(msg)
    return labels
