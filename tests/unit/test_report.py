"""The evaluation report: files written by ``evaluate`` rendered to HTML, checked in Chromium."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from fanomad_stream.cli import main
from fanomad_stream.config import AppConfig
from fanomad_stream.evaluate.metrics import evaluate_scores
from fanomad_stream.evaluate.run import Evaluation, write_outputs
from fanomad_stream.evaluate.series import (
    UNLABELLED,
    RoundRecord,
    load_rounds,
    load_series,
    source_arrays,
)

SOURCES = ("machine-1-3", "machine-1-4")
TRAIN_ROWS, TEST_ROWS = 300, 500


def synthetic_evaluation(seed: int = 5) -> Evaluation:
    """Build an Evaluation the way ``evaluate`` does, from seeded scores with anomalies."""
    rng = np.random.default_rng(seed)
    result = Evaluation(scores_total=len(SOURCES) * (TRAIN_ROWS + TEST_ROWS))
    for source in SOURCES:
        rows = TRAIN_ROWS + TEST_ROWS
        index = np.arange(rows)
        label = np.zeros(TEST_ROWS, dtype=np.int8)
        label[200:230] = 1
        label[400:410] = 1
        score = rng.gamma(2.0, 0.5, size=rows)
        score[TRAIN_ROWS:][label == 1] += 4.0
        threshold = np.full(rows, 3.0)
        threshold[:50] = np.finfo(np.float64).max  # warm-up, as the edge publishes it
        alert = score > threshold
        truth = {TRAIN_ROWS + i: int(v) for i, v in enumerate(label)}
        baselines = {"hst": rng.random(rows), "l2": score + rng.normal(0, 1, rows)}
        baselines["random"] = rng.random(rows)
        labelled = index >= TRAIN_ROWS
        result.per_source[source] = {
            "system": evaluate_scores(label, score[labelled], alert[labelled]),
            **{
                name: evaluate_scores(label, values[labelled]) for name, values in baselines.items()
            },
        }
        result.series[source] = source_arrays(index, score, threshold, alert, truth, baselines)
    result.labels_total = len(SOURCES) * TEST_ROWS
    result.rounds = [
        RoundRecord(
            round=r, version=r + 1, clients=list(SOURCES), train_loss=1.0 / (r + 1), epsilon=None
        )
        for r in range(4)
    ]
    return result


class TestSeriesFiles:
    def test_series_round_trip(self, tmp_path: Path) -> None:
        """write_outputs stores series and rounds that load back unchanged."""
        evaluation = synthetic_evaluation()
        write_outputs(evaluation, AppConfig(), tmp_path)

        series = load_series(tmp_path / "series.npz")
        rounds = load_rounds(tmp_path / "rounds.json")

        assert sorted(series) == list(SOURCES)
        for source in SOURCES:
            for name, array in evaluation.series[source].items():
                np.testing.assert_array_equal(series[source][name], array)
        assert rounds == evaluation.rounds

    def test_warmup_threshold_stored_as_nan(self) -> None:
        """The edge's warm-up placeholder threshold becomes NaN, so plots leave it blank."""
        arrays = synthetic_evaluation().series[SOURCES[0]]

        assert np.isnan(arrays["threshold"][:50]).all()
        assert np.isfinite(arrays["threshold"][50:]).all()

    def test_unlabelled_rows_marked(self) -> None:
        """Rows of the train half carry label -1 and the test half its 0/1 labels."""
        arrays = synthetic_evaluation().series[SOURCES[0]]

        assert (arrays["label"][:TRAIN_ROWS] == UNLABELLED).all()
        assert set(np.unique(arrays["label"][TRAIN_ROWS:])) == {0, 1}


@pytest.fixture(scope="module")
def report_page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write an evaluation folder and render its report through the CLI."""
    evaluation_dir = tmp_path_factory.mktemp("evaluation")
    write_outputs(synthetic_evaluation(), AppConfig(), evaluation_dir)
    assert main(["report", "--from", str(evaluation_dir)]) == 0
    return evaluation_dir / "report" / "report.html"


def test_report_is_self_contained(report_page: Path) -> None:
    """The page inlines every plot as a PNG data URI and loads nothing from elsewhere."""
    text = report_page.read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', text)
    expected = {f"timeline-{s}.png" for s in SOURCES} | {
        "roc.png",
        "pr.png",
        "calibration.png",
        "rounds.png",
    }

    assert len(sources) == len(expected)
    assert all(s.startswith("data:image/png;base64,") for s in sources)
    assert {p.name for p in report_page.parent.glob("*.png")} == expected
    assert "<th>system</th>" in text
    assert "<th>random</th>" in text
    assert "<th>local</th>" not in text  # the local baseline did not run here


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)


def test_report_renders_in_chromium(report_page: Path, tmp_path: Path) -> None:
    """Headless Chromium decodes every plot and paints a page that is not blank."""
    binary = chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it with apt-get")
        pytest.skip("chromium is not installed (Debian: apt-get install -y chromium)")
    url = report_page.as_uri()
    screenshot = tmp_path / "report.png"

    dom = run_chromium(
        binary, tmp_path / "profile-dom", "--virtual-time-budget=10000", "--dump-dom", url
    )
    shot = run_chromium(
        binary,
        tmp_path / "profile-shot",
        "--window-size=1280,2400",
        f"--screenshot={screenshot}",
        url,
    )

    assert dom.returncode == 0, dom.stderr[-2000:]
    expected = re.search(r'data-images-expected="(\d+)"', dom.stdout)
    decoded = re.search(r'data-images-decoded="(\d+)"', dom.stdout)
    assert expected is not None
    assert decoded is not None, "the page's load handler did not run"
    assert decoded.group(1) == expected.group(1) == str(len(SOURCES) + 4)
    assert shot.returncode == 0, shot.stderr[-2000:]
    pixels = imread(io.BytesIO(screenshot.read_bytes()))
    assert pixels.shape[0] >= 1000
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"
