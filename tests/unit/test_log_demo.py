"""The log demo's settings, data loading, scorer table and windowed PCA baseline."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fanomad_stream.config import parse_config
from fanomad_stream.demo_logs import load_demo_dataset
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.log_baselines import log_pca_scores
from fanomad_stream.evaluate.logs import render_scorer_table, scorer_rows
from fanomad_stream.replay.logs import LogRecord
from fanomad_stream.replay.streams import LOGHUB_DIR

BGL_LINE = (
    "{tag} 1117838570 2005.06.03 {node} 2005-06-03-15.42.50.675872 {node} RAS KERNEL INFO "
    "instruction cache parity error corrected\n"
)


def _write_bgl(folder: Path, lines: int) -> None:
    (folder / "BGL").mkdir(parents=True)
    text = "".join(
        BGL_LINE.format(tag="KERNDTLB" if i % 4 == 0 else "-", node=f"R0{i}-M1")
        for i in range(lines)
    )
    (folder / "BGL" / "BGL_2k.log").write_text(text)


@pytest.mark.parametrize(
    ("modalities", "detail"),
    [
        ([], "at least 1 item"),
        (["logs", "logs"], "must not repeat"),
        (["spans"], "'metrics', 'logs' or 'traces'"),
    ],
    ids=["empty", "repeated", "unknown"],
)
def test_nezha_modalities_rejected(modalities: list[str], detail: str) -> None:
    """nezha.modalities must be a non-empty list of distinct known modalities."""
    with pytest.raises(ConfigError, match=r"nezha\.modalities") as caught:
        parse_config({"nezha": {"modalities": modalities}})

    assert detail in str(caught.value)


def test_nezha_modalities_default_all() -> None:
    """Without the key the multimodal demo runs all three modalities."""
    assert parse_config({}).nezha.modalities == ["metrics", "logs", "traces"]


def test_demo_dataset_missing_folder(tmp_path: Path) -> None:
    """A missing LogHub folder fails with its path and the key to set."""
    config = parse_config({"log_demo": {"data_dir": str(tmp_path / "absent")}})

    with pytest.raises(ConfigError, match=r"log_demo\.data_dir") as caught:
        load_demo_dataset(config)

    assert str(tmp_path / "absent") in str(caught.value)


def test_demo_dataset_needs_line_scores(tmp_path: Path) -> None:
    """The MLP scores windows, so the per-line demo rejects it and names the key."""
    _write_bgl(tmp_path, 8)
    config = parse_config(
        {"log_demo": {"data_dir": str(tmp_path)}, "logs": {"model": {"kind": "mlp_autoencoder"}}}
    )

    with pytest.raises(ConfigError, match=r"logs\.model\.kind"):
        load_demo_dataset(config)


def test_demo_dataset_limit_and_single_stream(tmp_path: Path) -> None:
    """The limit cuts records and labels alike; one stream keys every line by the data set."""
    _write_bgl(tmp_path, 10)
    config = parse_config({"log_demo": {"data_dir": str(tmp_path), "limit": 6}})

    dataset = load_demo_dataset(config)

    assert len(dataset.records) == 6
    assert dataset.labels is not None
    assert dataset.labels.tolist() == [1, 0, 0, 0, 1, 0]
    assert {record.source for record in dataset.records} == {"bgl"}
    assert all("KERNDTLB" not in record.line for record in dataset.records)


def test_demo_dataset_per_node(tmp_path: Path) -> None:
    """With single_stream off every line keeps its node as source."""
    _write_bgl(tmp_path, 3)
    config = parse_config({"log_demo": {"data_dir": str(tmp_path), "single_stream": False}})

    dataset = load_demo_dataset(config)

    assert [record.source for record in dataset.records] == ["R00-M1", "R01-M1", "R02-M1"]


@pytest.mark.skipif(not (LOGHUB_DIR / "BGL").is_dir(), reason="LogHub not found beside checkout")
def test_demo_dataset_reads_bgl_sample() -> None:
    """The shipped demo config reads BGL_2k with its 143 anomalous lines labelled apart."""
    config = parse_config({"log_demo": {"dataset": "bgl"}})

    dataset = load_demo_dataset(config)

    assert len(dataset.records) == 2000
    assert dataset.labels is not None
    assert int(dataset.labels.sum()) == 143


def test_scorer_rows_with_and_without_alerts() -> None:
    """A scorer with alerts gets F1 and bursts; a baseline without them gets NaN and n/a."""
    labels = np.array([0, 0, 1, 1, 0, 0, 0, 0])
    windows = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    perfect = labels.astype(np.float64)
    alerts = labels.astype(bool)

    rows = scorer_rows(labels, windows, {"model": (perfect, alerts), "flat": (np.zeros(8), None)})

    model, flat = rows
    assert model.line_auroc == 1.0
    assert model.line_f1_operating == 1.0
    assert (model.windows, model.window_positives) == (4, 1)
    assert model.window_auroc == 1.0
    assert (model.bursts_detected, model.bursts) == (1, 1)
    assert flat.line_auroc == 0.5
    assert math.isnan(flat.line_f1_operating)
    assert flat.bursts_detected == -1
    table = render_scorer_table(rows)
    assert "| model | 8 (2) | 1.000 |" in table
    assert table.splitlines()[-1].endswith("| n/a |")


def test_pca_on_given_windows() -> None:
    """With window ids the PCA counts templates per given window and flags the odd one."""
    records = []
    for _ in range(20):
        records += [LogRecord(0.0, "n1", "job started ok"), LogRecord(0.0, "n1", "job done ok")]
    records += [LogRecord(0.0, "n1", "kernel panic now"), LogRecord(0.0, "n1", "kernel panic now")]
    window_ids = np.arange(len(records)) // 2

    scores = log_pca_scores(records, n_buckets=16, window_ids=window_ids)

    assert scores.shape == (len(records),)
    assert scores[-1] == scores[-2]
    assert scores[-1] > scores[:-2].max()


def test_pca_window_ids_shape_checked() -> None:
    """window_ids of the wrong length are rejected with both lengths."""
    records = [LogRecord(0.0, "n1", "a b c")] * 3

    with pytest.raises(ValueError, match=r"one id per record \(3\)"):
        log_pca_scores(records, window_ids=np.zeros(2, dtype=np.int64))
