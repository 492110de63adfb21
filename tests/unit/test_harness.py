from __future__ import annotations

import gzip
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fanomad_stream.evaluate import harness
from fanomad_stream.evaluate.baselines import BASELINES, ScoreSet, score_l2
from fanomad_stream.evaluate.smd import MachineSeries, load_series, load_test_labels
from fanomad_stream.evaluate.system import PRIVATE, SHIPPED, make_system_scorer

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


def _row(name: str, auroc_by_machine: dict[str, float]) -> harness.RowResult:
    per_machine = {
        seed: {m: dict.fromkeys(harness.METRICS, value) for m, value in auroc_by_machine.items()}
        for seed in (0, 1)
    }
    per_seed = {seed: {"auroc": 0.0} for seed in (0, 1)}
    return harness.RowResult(name, per_seed, per_machine, 0.0)


def test_held_out_choice_skips_machine() -> None:
    # "wide" wins on m1 and m2 together; "narrow" wins only on m3, by a large margin.
    rows = [
        _row("wide", {"m1": 0.9, "m2": 0.9, "m3": 0.5}),
        _row("narrow", {"m1": 0.8, "m2": 0.85, "m3": 0.99}),
    ]
    choices = {c.machine: c for c in harness.leave_one_machine_out(rows, "auroc")}
    assert choices["m3"].chosen == "wide"
    assert choices["m3"].held_out == pytest.approx(0.5)
    assert choices["m3"].best_on_machine == pytest.approx(0.99)
    # Without m1, the means are 0.7 and 0.92: the held-out figure is narrow's 0.8 on m1.
    assert choices["m1"].chosen == "narrow"
    assert choices["m1"].held_out == pytest.approx(0.8)
    assert "| mean |" in harness.format_held_out(rows, "auroc")


def test_held_out_rejects_unknown_metric() -> None:
    with pytest.raises(ValueError, match="unknown metric"):
        harness.leave_one_machine_out([_row("a", {"m1": 0.5})], "accuracy")


def test_json_rows_read_back_for_held_out(
    smd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "rows.json"
    argv = ["--data-dir", str(smd_dir), "--seeds", "0", "1", "--machines", *MACHINES]
    assert harness.main([*argv, "--rows", "random", "--json", str(path)]) == 0
    rows = harness.load_results(path)
    assert [row.name for row in rows] == ["random"]
    assert set(rows[0].per_seed) == {0, 1}
    capsys.readouterr()
    assert harness.main(["--from-json", str(path), "--held-out", "auroc"]) == 0
    assert "| held-out machine |" in capsys.readouterr().out


def test_private_row_spends_at_most_epsilon_8() -> None:
    assert 0 < PRIVATE.dp_epsilon() <= 8
    assert math.isinf(SHIPPED.dp_epsilon())


def test_private_training_changes_the_model(smd_dir: Path) -> None:
    series = _series(smd_dir)
    small_private = replace(PRIVATE, rounds=2, local_epochs=1, spot_warmup=500)
    plain = make_system_scorer(replace(small_private, dp_noise_multiplier=0.0))(series, 0)
    private = make_system_scorer(small_private)(series, 0)
    again = make_system_scorer(small_private)(series, 0)
    machine = MACHINES[0]
    assert not np.allclose(plain[machine].test_scores, private[machine].test_scores)
    # The harness keys the noise from the seed, so a private row is reproducible.
    assert np.array_equal(private[machine].test_scores, again[machine].test_scores)
