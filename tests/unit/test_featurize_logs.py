"""Template mining with per-client state, and the log window features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fanomad_stream.featurize.logs import (
    LogFeaturizer,
    LogTemplateMiner,
    LogWindower,
    MinedLine,
    feature_names,
    line_vectors,
    template_bucket,
    window_vector,
)
from fanomad_stream.replay.logs import LogRecord, read_bgl

LOGHUB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "loghub"


def synthetic_records(n: int) -> list[LogRecord]:
    """Lines of four message shapes, the fourth appearing only after the first half."""
    shapes = [
        "session opened for user {i}",
        "connection from 10.0.0.{i} port {i}",
        "disk sda{i} temperature {i} ok",
        "kernel panic in module mod{i}",
    ]
    records = []
    for i in range(n):
        shape = shapes[i % 4] if i >= n // 2 else shapes[i % 3]
        level = "FATAL" if "panic" in shape else "INFO"
        records.append(
            LogRecord(ts=float(i), source=f"node{i % 2}", line=shape.format(i=i), level=level)
        )
    return records


def mined(
    bucket: int, *, ts: float = 0.0, source: str = "a", new: bool = False, level: str = "INFO"
) -> MinedLine:
    record = LogRecord(ts=ts, source=source, line="x", level=level)
    return MinedLine(record=record, cluster_id=bucket + 1, template="x", bucket=bucket, is_new=new)


class TestTemplateMiner:
    def test_restart_keeps_template_ids(self, tmp_path: Path) -> None:
        """A miner rebuilt from its state file gives the same ids as one that never stopped."""
        records = synthetic_records(200)
        state = tmp_path / "client-1" / "drain3.state"
        first = LogTemplateMiner(state).mine_all(records[:100])
        assert state.is_file()
        second = LogTemplateMiner(state).mine_all(records[100:])
        reference = LogTemplateMiner(None).mine_all(records)
        assert [m.cluster_id for m in first + second] == [m.cluster_id for m in reference]
        assert [m.bucket for m in first + second] == [m.bucket for m in reference]
        assert not any(m.is_new for m in second[:3])

    def test_without_state_restart_renumbers(self, tmp_path: Path) -> None:
        """A fresh miner with another state file starts its ids over, so the file matters."""
        records = synthetic_records(40)
        LogTemplateMiner(tmp_path / "a.state").mine_all(records[:20])
        fresh = LogTemplateMiner(tmp_path / "b.state").mine_all(records[20:])
        assert fresh[0].is_new

    def test_new_template_flagged_mid_stream(self) -> None:
        """The first line of a shape never seen before is flagged new, later ones are not."""
        lines = LogTemplateMiner(None).mine_all(synthetic_records(40))
        panics = [m for m in lines if "panic" in m.record.line]
        assert panics[0].is_new
        assert not any(m.is_new for m in panics[1:])
        assert panics[0].is_error
        assert len({m.cluster_id for m in lines}) == 4

    def test_rejects_bad_parameters(self) -> None:
        """An out-of-range threshold raises ValueError with the value."""
        with pytest.raises(ValueError, match=r"1\.5"):
            LogTemplateMiner(None, similarity_threshold=1.5)

    @pytest.mark.skipif(not LOGHUB.is_dir(), reason=f"LogHub samples not found at {LOGHUB}")
    def test_bgl_restart_matches_uninterrupted(self, tmp_path: Path) -> None:
        """On BGL_2k a restart half-way keeps every cluster id of an uninterrupted run."""
        records = read_bgl(LOGHUB / "BGL" / "BGL_2k.log").records
        state = tmp_path / "bgl.state"
        resumed = LogTemplateMiner(state).mine_all(records[:1000])
        resumed += LogTemplateMiner(state).mine_all(records[1000:])
        reference = LogTemplateMiner(None).mine_all(records)
        assert [m.cluster_id for m in resumed] == [m.cluster_id for m in reference]


def test_template_bucket_stable_and_in_range() -> None:
    """The bucket depends only on the text, and lies in [0, n_buckets)."""
    buckets = [template_bucket(f"template {i}", 16) for i in range(100)]
    assert buckets == [template_bucket(f"template {i}", 16) for i in range(100)]
    assert min(buckets) >= 0
    assert max(buckets) < 16
    assert len(set(buckets)) > 8


def test_window_vector_columns() -> None:
    """Counts land in their buckets (log1p), with new, line, rate and error columns after."""
    lines = [mined(0), mined(0), mined(2, new=True, level="ERROR"), mined(3)]
    vector = window_vector(lines, duration_s=2.0, n_buckets=4)
    assert vector.shape == (len(feature_names(4)),)
    assert vector.dtype == np.float32
    np.testing.assert_allclose(vector[:4], np.log1p([2, 0, 1, 1]))
    np.testing.assert_allclose(vector[4:], [np.log1p(1), np.log1p(4), 2.0, 0.25], rtol=1e-6)


def test_window_vector_empty_window() -> None:
    """An empty window is all zeros, not NaN."""
    vector = window_vector([], duration_s=1.0, n_buckets=3)
    np.testing.assert_array_equal(vector, np.zeros(7))


def test_line_vectors_one_hot() -> None:
    """Each line is a one-hot bucket plus new and error flags."""
    rows = line_vectors([mined(1), mined(0, new=True, level="fatal")], n_buckets=2)
    np.testing.assert_array_equal(rows, [[0, 1, 0, 0], [1, 0, 1, 1]])


class TestLogWindower:
    def test_closes_on_later_line(self) -> None:
        """A line past the window end closes the source's window; other sources stay open."""
        windower = LogWindower(10.0)
        assert windower.add(mined(0, ts=1.0)) == []
        assert windower.add(mined(0, ts=2.0, source="b")) == []
        closed = windower.add(mined(1, ts=12.0))
        assert len(closed) == 1
        assert closed[0].source == "a"
        assert closed[0].start == 0.0
        assert sorted(w.source for w in windower.flush()) == ["a", "b"]

    def test_late_line_counted(self) -> None:
        """A line older than the open window joins it and is counted as late."""
        windower = LogWindower(10.0)
        windower.add(mined(0, ts=15.0))
        windower.add(mined(0, ts=3.0))
        assert windower.late_lines == 1
        (window,) = windower.flush()
        assert len(window.lines) == 2

    def test_max_lines_closes_window(self) -> None:
        """A window closes as soon as it contains max_lines lines."""
        windower = LogWindower(10.0, max_lines=2)
        assert windower.add(mined(0, ts=1.0)) == []
        assert len(windower.add(mined(0, ts=2.0))) == 1
        assert windower.flush() == []


def test_featurizer_windows_per_source(tmp_path: Path) -> None:
    """The pipeline closes one window per source and time span, each of fixed width."""
    featurizer = LogFeaturizer(tmp_path / "state", n_buckets=8, window_s=50.0)
    closed = []
    for record in synthetic_records(120):
        line, windows = featurizer.add(record)
        assert line.record is record
        closed += windows
    closed += featurizer.flush()
    assert sorted((w.source, w.start) for w in closed) == [
        (f"node{n}", start) for n in range(2) for start in (0.0, 50.0, 100.0)
    ]
    assert sum(w.lines for w in closed) == 120
    assert all(w.vector.shape == (featurizer.n_features,) for w in closed)
    assert (tmp_path / "state").is_file()
