"""LogHub readers: record fields, label stripping and the DeepLog sessions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fanomad_stream.replay.logs import (
    LogRecord,
    Session,
    block_ids,
    fixed_rate_offsets,
    read_bgl,
    read_hdfs,
    read_hdfs_sessions,
    read_thunderbird,
    split_sessions,
)

LOGHUB = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "loghub"
needs_loghub = pytest.mark.skipif(
    not LOGHUB.is_dir(), reason=f"LogHub samples not found at {LOGHUB}; they are not shipped"
)


@needs_loghub
class TestLogHubFiles:
    def test_bgl_labels_match_structured_file(self) -> None:
        """BGL gives 2,000 records with 143 alerts, and labels equal the raw first tokens."""
        data = read_bgl(LOGHUB / "BGL" / "BGL_2k.log")
        assert len(data.records) == 2000
        assert data.labels is not None
        assert data.categories is not None
        assert int(data.labels.sum()) == 143
        assert data.categories.count("KERNDTLB") == 60
        assert all(r.ts > 1.1e9 for r in data.records)

    def test_bgl_line_never_holds_label(self) -> None:
        """No record text of an alert line contains its alert tag."""
        data = read_bgl(LOGHUB / "BGL" / "BGL_2k.log")
        assert data.categories is not None
        for record, tag in zip(data.records, data.categories, strict=True):
            assert not record.line.startswith(tag + " ")
            if tag != "-":
                assert tag not in f"{record.source} {record.level} {record.line}"

    def test_bgl_first_record_fields(self) -> None:
        """The first BGL line parses into its epoch, node, level and message."""
        first = read_bgl(LOGHUB / "BGL" / "BGL_2k.log").records[0]
        assert first == LogRecord(
            ts=1117838570.0,
            source="R02-M1-N0-C:J12-U11",
            line="KERNEL INFO instruction cache parity error corrected",
            level="INFO",
        )

    def test_thunderbird_all_normal(self) -> None:
        """Thunderbird_2k has 2,000 records and no alert, and the text starts at the component."""
        data = read_thunderbird(LOGHUB / "Thunderbird" / "Thunderbird_2k.log")
        assert len(data.records) == 2000
        assert data.labels is not None
        assert int(data.labels.sum()) == 0
        assert data.records[0].line == "crond(pam_unix)[2915]: session closed for user root"
        assert data.records[0].source == "dn228"

    def test_hdfs_unlabelled_in_time_order(self) -> None:
        """HDFS_2k is unlabelled, keyed by component, and in time order."""
        data = read_hdfs(LOGHUB / "HDFS" / "HDFS_2k.log")
        assert len(data.records) == 2000
        assert data.labels is None
        assert data.records[0].source == "dfs.DataNode$PacketResponder"
        assert data.records[0].level == "INFO"
        times = np.array([r.ts for r in data.records])
        assert (np.diff(times) >= 0).all()
        blocks = {b for r in data.records for b in block_ids(r.line)}
        assert len(blocks) == 2200

    def test_sessions_chronological_split(self) -> None:
        """Sessions keep file order; the split holds out the tail of the normal ones."""
        sessions = read_hdfs_sessions(
            LOGHUB / "HDFS_sessions_deeplog", max_normal=100, max_abnormal=20
        )
        assert len(sessions) == 120
        assert sessions[0].keys[:4] == (5, 5, 5, 22)
        train, test = split_sessions(sessions, 0.8)
        assert len(train) == 80
        assert [s.label for s in test].count(0) == 20
        assert [s.label for s in test].count(1) == 20
        assert test[0] == sessions[80]


def test_reader_names_missing_file(tmp_path: Path) -> None:
    """A missing file raises FileNotFoundError naming the path."""
    with pytest.raises(FileNotFoundError, match=r"nope\.log"):
        read_bgl(tmp_path / "nope.log")


def test_bgl_short_line_rejected(tmp_path: Path) -> None:
    """A BGL line with too few fields raises ValueError with its line number."""
    path = tmp_path / "short.log"
    path.write_text("- 1117838570 2005.06.03 node\n")
    with pytest.raises(ValueError, match=r"short\.log:1"):
        read_bgl(path)


def test_session_keys_must_be_integers(tmp_path: Path) -> None:
    """A session line with a non-integer key raises ValueError naming the line."""
    (tmp_path / "hdfs_train.txt").write_text("5 5 x\n")
    (tmp_path / "hdfs_test_abnormal.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match=r"hdfs_train\.txt:1"):
        read_hdfs_sessions(tmp_path)


def test_split_rejects_bad_share() -> None:
    """A train share outside (0, 1) raises ValueError with the value."""
    with pytest.raises(ValueError, match=r"1\.5"):
        split_sessions([Session((1,), 0)], 1.5)


def test_fixed_rate_offsets() -> None:
    """Offsets step by 1/rate, and rate 0 means no pacing."""
    np.testing.assert_allclose(fixed_rate_offsets(3, 2.0), [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(fixed_rate_offsets(2, 0.0), [0.0, 0.0])
    with pytest.raises(ValueError, match="-1"):
        fixed_rate_offsets(2, -1.0)
