from __future__ import annotations

import gzip
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fanomad_stream.evaluate import harness
from fanomad_stream.evaluate.baselines import BASELINES, ScoreSet, score_l2
from fanomad_stream.evaluate.smd import MachineSeries, load_series, load_test_labels
from fanomad_stream.evaluate.system import SHIPPED, make_system_scorer

MACHINES = ("machine-1-2", "machine-1-3")
ROWS = 600


def _write_machine(root: Path, machine: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    phase = rng.uniform(0, 2 * np.pi, size=38)
    cycle = 0.1 * np.sin(np.arange(2 * ROWS)[:, None] / 30 + phase)
    values = 0.5 + cycle + rng.normal(scale=0.02, size=cycle.shape)
    values[:, 5] = 0.25  # constant over train and test, as some SMD columns are
    labels = np.zeros(ROWS, dtype=np.int8)
    labels[300:330] = 1
    values[ROWS + 300 : ROWS + 330, :10] += 0.5
    for part, block in (("train", values[:ROWS]), ("test", values[ROWS:])):
        (root / part).mkdir(parents=True, exist_ok=True)
        with gzip.open(root / part / f"{machine}.txt.gz", "wt") as handle:
            np.savetxt(handle, block, fmt="%.6f", delimiter=",")
    (root / "test_label").mkdir(exist_ok=True)
    np.savetxt(root / "test_label" / f"{machine}.txt", labels, fmt="%d")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def smd_dir(tmp_path: Path) -> Path:
    for seed, machine in enumerate(MACHINES):
        _write_machine(tmp_path, machine, seed)
    return tmp_path


def _series(root: Path) -> dict[str, MachineSeries]:
    return {machine: load_series(root, machine) for machine in MACHINES}


SMALL_SYSTEM = replace(SHIPPED, rounds=2, local_epochs=1, spot_warmup=500)


def test_scoring_runs_without_label_files(smd_dir: Path) -> None:
    for machine in MACHINES:
        (smd_dir / "test_label" / f"{machine}.txt").unlink()
    scorers = {**BASELINES, "system": make_system_scorer(SMALL_SYSTEM)}
    scores, _ = harness.score_all(scorers, _series(smd_dir), seeds=[0])
    assert set(scores) == set(scorers)
    with pytest.raises(FileNotFoundError, match="test_label"):
        load_test_labels(smd_dir, MACHINES[0], ROWS)


def test_run_reads_labels_after_scoring(smd_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []

    def recording_scorer(series: dict[str, MachineSeries], seed: int) -> dict[str, ScoreSet]:
        events.append("score")
        return score_l2(series, seed)

    def recording_loader(data_dir: Path, machine: str, n_rows: int) -> np.ndarray:
        events.append("labels")
        return load_test_labels(data_dir, machine, n_rows)

    monkeypatch.setattr(harness, "load_test_labels", recording_loader)
    harness.run(
        smd_dir, {"a": recording_scorer, "b": recording_scorer}, seeds=[0, 1], machines=MACHINES
    )
    assert events == ["score"] * 4 + ["labels"] * len(MACHINES)


def test_label_count_mismatch_raises(smd_dir: Path) -> None:
    with pytest.raises(ValueError, match="599 test rows"):
        load_test_labels(smd_dir, MACHINES[0], ROWS - 1)


def test_baseline_threshold_is_train_quantile(smd_dir: Path) -> None:
    scores = score_l2(_series(smd_dir), 0)[MACHINES[0]]
    assert np.all(scores.test_thresholds == np.quantile(scores.train_scores, 0.99))


def test_system_scores_and_thresholds_are_causal(smd_dir: Path) -> None:
    series = _series(smd_dir)
    scorer = make_system_scorer(SMALL_SYSTEM)
    before = scorer(series, 0)[MACHINES[0]]
    changed = dict(series)
    test = series[MACHINES[0]].test.copy()
    test[250:] += np.random.default_rng(9).normal(scale=0.02, size=test[250:].shape)
    changed[MACHINES[0]] = MachineSeries(MACHINES[0], series[MACHINES[0]].train, test)
    after = scorer(changed, 0)[MACHINES[0]]
    assert np.array_equal(before.test_scores[:250], after.test_scores[:250])
    # Batches are 100 rows, so the batch holding row 250 is thresholded before it is seen.
    assert np.array_equal(before.test_thresholds[:300], after.test_thresholds[:300])
    assert np.all(np.isfinite(before.test_thresholds))
    assert not np.array_equal(before.test_thresholds[300:], after.test_thresholds[300:])


def test_evaluation_ranks_injected_anomaly(smd_dir: Path) -> None:
    rows = harness.run(
        smd_dir, {"random": BASELINES["random"], "l2": score_l2}, seeds=[0, 1], machines=MACHINES
    )
    by_name = {row.name: row for row in rows}
    assert by_name["l2"].mean("auroc") > 0.95
    assert abs(by_name["random"].mean("auroc") - 0.5) < 0.1
    assert by_name["random"].spread("auroc") > 0.0
    assert by_name["l2"].spread("auroc") == 0.0


def test_main_prints_selected_rows(smd_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--data-dir", str(smd_dir), "--seeds", "0", "--machines", *MACHINES, "--rows", "random"]
    assert harness.main(argv) == 0
    out = capsys.readouterr().out
    assert "| random |" in out
    assert "L2 norm" not in out


def test_main_rejects_unknown_row(smd_dir: Path) -> None:
    with pytest.raises(SystemExit, match="--list"):
        harness.main(["--data-dir", str(smd_dir), "--rows", "no such row"])
