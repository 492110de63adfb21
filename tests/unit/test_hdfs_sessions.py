"""HDFS block sessions as a live log stream: event ids, interleaving, session windows."""

from __future__ import annotations

import base64
import json
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from structlog.testing import capture_logs

from fanomad_stream.config import parse_config
from fanomad_stream.demo_logs import (
    evaluated_lines,
    load_demo_dataset,
    session_numbers,
    site_sources,
)
from fanomad_stream.detect.factory import build_threshold
from fanomad_stream.detect.spot import SpotThreshold
from fanomad_stream.detect.threshold import QuantileThreshold
from fanomad_stream.edge.modalities import Incoming, LogsPipeline
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.logs import render_session_table, session_scorer_rows
from fanomad_stream.featurize.logs import LogTemplateMiner, LogWindower
from fanomad_stream.modalities import modality_config
from fanomad_stream.replay.logs import END_EVENT, LogRecord, Session, interleave_sessions

SESSIONS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "loghub"


def sessions() -> list[Session]:
    return [
        Session((5, 5, 22, 11, 9), 0),
        Session((22, 5), 1),
        Session((5, 22, 11, 9, 26, 26), 0),
        Session((7,), 1),
        Session((5, 5, 5, 22), 0),
    ]


class TestInterleave:
    def test_blocks_keep_order_and_end_line(self) -> None:
        dataset = interleave_sessions(sessions(), concurrency=3, seed=1)
        by_block: dict[str, list[str]] = {}
        for record in dataset.records:
            by_block.setdefault(record.source, []).append(record.event)
        for number, session in enumerate(sessions()):
            expected = [str(key) for key in session.keys] + [END_EVENT]
            assert by_block[f"blk_{number}"] == expected
        assert dataset.labels is not None
        for record, label in zip(dataset.records, dataset.labels, strict=True):
            assert label == sessions()[int(record.source[4:])].label
        assert all(record.line == "" for record in dataset.records)

    def test_blocks_overlap_but_never_more_than_the_concurrency(self) -> None:
        dataset = interleave_sessions(sessions() * 4, concurrency=2, seed=0)
        open_blocks: set[str] = set()
        ended: set[str] = set()
        peak = 0
        for record in dataset.records:
            assert record.source not in ended
            open_blocks.add(record.source)
            peak = max(peak, len(open_blocks))
            if record.event == END_EVENT:
                open_blocks.discard(record.source)
                ended.add(record.source)
        assert peak == 2
        sources = [record.source for record in dataset.records]
        assert sources != sorted(sources, key=lambda source: int(source[4:]))

    def test_same_seed_same_stream(self) -> None:
        first = interleave_sessions(sessions(), concurrency=3, seed=4)
        again = interleave_sessions(sessions(), concurrency=3, seed=4)
        other = interleave_sessions(sessions(), concurrency=3, seed=5)
        assert first.records == again.records
        assert first.records != other.records

    def test_rejects_zero_concurrency(self) -> None:
        with pytest.raises(ValueError, match="concurrency must be >= 1, got 0"):
            interleave_sessions(sessions(), concurrency=0, seed=0)


class TestEventIds:
    def test_event_is_the_template_and_new_only_once(self) -> None:
        miner = LogTemplateMiner(None, n_buckets=256)
        lines = [miner.mine(LogRecord(0.0, "blk_1", "", event=event)) for event in ["5", "22", "5"]]
        assert [line.cluster_id for line in lines] == [-1, -2, -1]
        assert [line.is_new for line in lines] == [True, True, False]
        assert lines[0].template == "event 5"
        assert lines[0].bucket == lines[2].bucket
        assert miner.template_count == 0  # drain3 never saw these lines

    def test_restart_keeps_event_ids(self, tmp_path: Path) -> None:
        state = tmp_path / "site" / "drain3.json"
        first = LogTemplateMiner(state)
        first.mine(LogRecord(0.0, "a", "", event="9"))
        first.mine(LogRecord(0.0, "a", "disk sda ok"))
        again = LogTemplateMiner(state)
        line = again.mine(LogRecord(0.0, "b", "", event="9"))
        assert (line.cluster_id, line.is_new) == (-1, False)
        assert again.mine(LogRecord(0.0, "b", "", event="11")).cluster_id == -2

    @pytest.mark.parametrize(
        "content",
        [
            "[1, 2]",
            "null",
            "{not json",
            '{"5": [1]}',
            '{"5": "x"}',
            '{"5": 1e400}',
            '{"5": true}',
            '{"5": -1, "22": -1}',
            '{"5": 4}',
            '{"5": -1, "22": -3}',
            '{"1": -1, "2": -2, "3": -3}',
        ],
    )
    def test_unusable_event_file_is_set_aside(self, tmp_path: Path, content: str) -> None:
        """A damaged or hand-edited event file is moved aside, and the ids start afresh."""
        events = tmp_path / "drain3-events.json"
        events.write_text(content)
        with capture_logs() as logs:
            miner = LogTemplateMiner(tmp_path / "drain3.json", max_templates=2)
        assert miner.events == {}
        assert not events.exists()
        assert (tmp_path / "drain3-events.json.rejected").read_text() == content
        (entry,) = [e for e in logs if e["event"] == "log_template_state_rejected"]
        assert entry["log_level"] == "warning"
        assert entry["path"] == str(events)
        line = miner.mine(LogRecord(0.0, "a", "", event="5"))
        assert (line.cluster_id, line.is_new) == (-1, True)
        assert json.loads(events.read_text()) == {"5": -1}

    @pytest.mark.parametrize(
        "content",
        [
            b"garbage",
            b"",
            base64.b64encode(zlib.compress(b"[1, 2]")),  # drain3's encoding, a list inside
            base64.b64encode(zlib.compress(b'{"root_node": 1, "id_to_cluster": {}}')),
            base64.b64encode(zlib.compress(b'{"py/object": "drain3.drain.Drain", "root_node": 1}')),
        ],
    )
    def test_unusable_drain3_file_is_set_aside(self, tmp_path: Path, content: bytes) -> None:
        """A drain3 file that fails to load is moved aside, and mining starts afresh."""
        state = tmp_path / "drain3.json"
        state.write_bytes(content)
        with capture_logs() as logs:
            miner = LogTemplateMiner(state)
        assert miner.template_count == 0
        assert (tmp_path / "drain3.json.rejected").read_bytes() == content
        assert [e["event"] for e in logs] == ["log_template_state_rejected"]
        miner.mine(LogRecord(0.0, "a", "disk sda ok"))
        assert LogTemplateMiner(state).template_count == 1

    def test_restore_rejects_hand_edited_event_ids(self) -> None:
        miner = LogTemplateMiner(None)
        miner.mine(LogRecord(0.0, "a", "", event="5"))
        state = {**miner.snapshot(), "events": {"5": -1, "22": -7}}
        with pytest.raises(ValueError, match="must be -1 to -2, each once"):
            LogTemplateMiner(None).restore(state)

    def test_events_past_the_bound_are_counted_not_kept(self, tmp_path: Path) -> None:
        miner = LogTemplateMiner(tmp_path / "d.json", max_templates=2)
        for event in ["1", "2", "3", "3"]:
            line = miner.mine(LogRecord(0.0, "a", "", event=event))
        assert line.is_new and line.cluster_id == 0
        assert miner.events_dropped == 2
        saved = json.loads((tmp_path / "d-events.json").read_text())
        assert saved == {"1": -1, "2": -2}


def session_config(**logs: object) -> dict[str, object]:
    return {
        "edge": {"window_events": 50, "hst_window": 10, "threshold": {"warmup_events": 10}},
        "logs": {"n_buckets": 32, "window_s": 1e6, **logs},
    }


class TestSessionWindows:
    def test_end_line_closes_only_its_own_block(self) -> None:
        windower = LogWindower(1e6, end_event=END_EVENT)
        miner = LogTemplateMiner(None)
        closed = []
        for source, event in [("a", "5"), ("b", "5"), ("a", END_EVENT), ("b", "9")]:
            closed += windower.add(miner.mine(LogRecord(0.0, source, "", event=event)))
        assert [(w.source, len(w.lines)) for w in closed] == [("a", 2)]
        assert [(w.source, len(w.lines)) for w in windower.flush()] == [("b", 2)]

    def test_mlp_scores_session_at_end_line(self) -> None:
        config = parse_config(
            session_config(session_end_event=END_EVENT, model={"kind": "mlp_autoencoder"})
        )
        pipeline = LogsPipeline(modality_config(config, "logs"), None)
        dataset = interleave_sessions(sessions() * 4, concurrency=3, seed=0)
        batch = [Incoming(r, i, 0, i) for i, r in enumerate(dataset.records)]
        scored = pipeline.process(batch)
        assert len(scored) == 20
        for item in scored:
            assert dataset.records[item.index].event == END_EVENT
            assert dataset.records[item.index].source == item.key
        assert set(pipeline.scalers) == {"site"}
        assert set(pipeline.thresholds) == {"site"}
        assert pipeline.windows_scored == {}
        assert pipeline.window_ready() is False  # 20 sessions of a window of 50

    def test_sequence_contexts_are_bounded(self) -> None:
        config = parse_config(
            session_config(
                max_sources=2, model={"kind": "lstm_autoencoder", "hidden": [8, 4], "window": 4}
            )
        )
        pipeline = LogsPipeline(modality_config(config, "logs"), None)
        for i, source in enumerate(["a", "b", "c", "a"]):
            pipeline.process([Incoming(LogRecord(0.0, source, "", event="5"), i, 0, i)])
        assert list(pipeline.contexts) == ["c", "a"]
        assert pipeline.sources_dropped == 2  # a, then b
        assert pipeline.contexts["a"].seen == 1  # "a" came back with a fresh window

    def test_sequence_model_keeps_no_windows(self) -> None:
        """Lines a sequence model scores are not windowed, so no source leaves a window."""
        config = parse_config(
            session_config(model={"kind": "lstm_autoencoder", "hidden": [8, 4], "window": 4})
        )
        pipeline = LogsPipeline(modality_config(config, "logs"), None)
        records = [LogRecord(float(i), f"blk_{i // 3}", "", event="5") for i in range(300)]
        scored = pipeline.process([Incoming(r, i, 0, i) for i, r in enumerate(records)])
        assert len(scored) == 300
        assert pipeline.featurizer.windower.open_windows == 0

    def test_open_windows_are_bounded(self) -> None:
        """Past max_open, the window of the least recently written source closes early."""
        windower = LogWindower(1e6, end_event=END_EVENT, max_open=2)
        miner = LogTemplateMiner(None)
        closed = []
        for i, source in enumerate(["a", "b", "a", "c", "a", "d"]):
            line = miner.mine(LogRecord(0.0, source, "", event="5"))
            closed += windower.add(line, ref=i)
        assert [(w.source, len(w.lines), w.ref) for w in closed] == [("b", 1, 1), ("c", 1, 3)]
        assert windower.evicted == 2
        assert [(w.source, len(w.lines), w.ref) for w in windower.flush()] == [
            ("a", 3, 4),
            ("d", 1, 5),
        ]

    def test_unended_sessions_scored_once_at_last_line(self) -> None:
        """Blocks without an end line are scored when pushed out, by their own last line."""
        config = parse_config(
            session_config(
                session_end_event=END_EVENT, max_sources=3, model={"kind": "mlp_autoencoder"}
            )
        )
        pipeline = LogsPipeline(modality_config(config, "logs"), None)
        records = [
            LogRecord(float(i), f"blk_{i // 4}", "", event=str(i % 4)) for i in range(4 * 50)
        ]
        batch = [Incoming(r, i, 0, 1000 + i) for i, r in enumerate(records)]
        scored = pipeline.process(batch) + pipeline.flush()
        assert [item.key for item in scored] == [f"blk_{n}" for n in range(50)]
        assert [item.index for item in scored] == [4 * n + 3 for n in range(50)]
        assert [item.offset for item in scored] == [1000 + 4 * n + 3 for n in range(50)]
        assert all(item.detail["lines"] == 4 for item in scored)
        assert pipeline.windows_evicted == 47
        assert pipeline.featurizer.windower.open_windows == 0

    def test_per_source_state_is_bounded(self) -> None:
        """Scalers, thresholds and window counts of the MLP keep max_sources sources."""
        config = parse_config(
            {
                "edge": {"window_events": 50, "threshold": {"warmup_events": 10}},
                "logs": {
                    "n_buckets": 8,
                    "window_s": 1.0,
                    "max_sources": 5,
                    "model": {"kind": "mlp_autoencoder"},
                },
            }
        )
        pipeline = LogsPipeline(modality_config(config, "logs"), None)
        # Every source writes two lines one second apart, so the second closes the first's
        # window, and then never writes again.
        records = []
        for n in range(200):
            records += [LogRecord(float(n), f"blk_{n}", "x"), LogRecord(n + 1.0, f"blk_{n}", "x")]
        scored = pipeline.process([Incoming(r, i, 0, i) for i, r in enumerate(records)])
        assert len(scored) == 200 + pipeline.windows_evicted
        assert len(pipeline.scalers) == 5
        assert next(reversed(pipeline.scalers)) == "blk_199"
        assert set(pipeline.thresholds) == set(pipeline.scalers)
        assert set(pipeline.windows_scored) == set(pipeline.scalers)
        assert pipeline.featurizer.windower.open_windows == 5
        assert pipeline.windows_evicted == 195
        assert pipeline.sources_dropped >= 195  # a source pushed out and back counts again

    @pytest.mark.parametrize("prefixes", [True, False])
    def test_first_lines_alert_only_with_prefix_training(self, prefixes: bool) -> None:
        """Without prefix training, a block's first window - 1 lines never alert."""
        model = {"kind": "lstm_autoencoder", "hidden": [8, 4], "window": 4}
        config = parse_config(
            {
                "edge": {"threshold": {"warmup_events": 10, "quantile": 0.51}},
                "logs": {"n_buckets": 32, "model": {**model, "train_prefixes": prefixes}},
            }
        )
        pipeline = LogsPipeline(modality_config(config, "logs"), None)
        records = [LogRecord(0.0, f"blk_{i}", "", event=str(i % 7)) for i in range(60)]
        scored = pipeline.process([Incoming(r, i, 0, i) for i, r in enumerate(records)])
        over = [item for item in scored if item.score > item.threshold]
        assert len(over) > 5
        assert all(item.alert == prefixes for item in over)


class TestThresholdKinds:
    def test_kind_picks_the_rule(self) -> None:
        spot = parse_config({"edge": {"threshold": {"kind": "spot", "warmup_events": 500}}})
        assert isinstance(build_threshold(spot.edge.threshold), SpotThreshold)
        assert isinstance(build_threshold(parse_config({}).edge.threshold), QuantileThreshold)

    def test_spot_needs_a_long_warm_up(self) -> None:
        with pytest.raises(ConfigError, match="needs >= 500, got 100"):
            parse_config({"edge": {"threshold": {"kind": "spot", "warmup_events": 100}}})


class TestSessionEvaluation:
    def test_session_rows_fold_lines_per_session(self) -> None:
        labels = np.array([0, 0, 1, 1, 0, 1])
        ids = np.array([0, 0, 1, 1, 2, 3])
        scores = np.array([0.1, 0.2, 0.9, 0.1, 0.3, 0.8])
        alerts = np.array([False, False, True, False, True, False])
        detector, baseline = session_scorer_rows(
            labels, ids, {"d": (scores, alerts), "b": (np.array([9, 9, 1, 1, 9, 1]), None)}
        )
        assert (detector.sessions, detector.anomalous) == (4, 2)
        assert detector.auroc_max == 1.0
        assert baseline.auroc_max == 0.0
        assert detector.precision_operating == 0.5  # sessions 1 and 2 alerted
        assert detector.recall_operating == 0.5
        assert np.isnan(baseline.f1_operating)
        table = render_session_table([detector, baseline])
        assert "| b | 4 (2) |" in table
        assert "n/a" in table

    def test_site_sources_dealt_in_turn(self) -> None:
        dataset = interleave_sessions(sessions(), concurrency=1, seed=0)
        assert site_sources(dataset, 2) == [["blk_0", "blk_2", "blk_4"], ["blk_1", "blk_3"]]
        with pytest.raises(ConfigError, match=r"log_demo\.sites is 6, but the replay has 5"):
            site_sources(dataset, 6)


def hdfs_demo(**sessions: object) -> dict[str, object]:
    return {
        "logs": {"model": {"kind": "lstm_autoencoder"}},
        "log_demo": {
            "dataset": "hdfs_sessions",
            "single_stream": False,
            "data_dir": str(SESSIONS),
            "sessions": sessions,
        },
    }


class TestDemoSettings:
    def test_sessions_need_separate_sources(self) -> None:
        with pytest.raises(ConfigError, match="single_stream must be false for hdfs_sessions"):
            parse_config({"log_demo": {"dataset": "hdfs_sessions"}})

    def test_window_mlp_needs_session_windows(self) -> None:
        raw = hdfs_demo()
        raw["logs"] = {"model": {"kind": "mlp_autoencoder"}}
        with pytest.raises(ConfigError, match=r"set logs\.session_end_event to 'end'"):
            load_demo_dataset(parse_config(raw))

    def test_session_end_needs_session_data(self) -> None:
        raw = {"logs": {"session_end_event": "end", "model": {"kind": "mlp_autoencoder"}}}
        with pytest.raises(ConfigError, match="has no session end lines"):
            load_demo_dataset(parse_config(raw))

    @pytest.mark.skipif(not (SESSIONS / "HDFS_sessions_deeplog").is_dir(), reason="no sessions")
    def test_demo_stream_warms_up_on_normal_blocks_first(self) -> None:
        config = parse_config(
            hdfs_demo(warmup_sessions=30, normal_sessions=20, anomalous_sessions=5)
        )
        dataset = load_demo_dataset(config)
        assert dataset.labels is not None
        numbers = session_numbers(dataset)
        labels = dict(zip(numbers.tolist(), dataset.labels.tolist(), strict=True))
        assert len(labels) == 55
        assert Counter(labels.values()) == {0: 50, 1: 5}
        assert all(labels[n] == 0 for n in range(30))
        counted = evaluated_lines(dataset, config)
        assert set(numbers[counted].tolist()) == set(range(30, 55))

    @pytest.mark.skipif(not (SESSIONS / "HDFS_sessions_deeplog").is_dir(), reason="no sessions")
    def test_too_many_sessions_rejected(self) -> None:
        config = parse_config(hdfs_demo(warmup_sessions=4000, normal_sessions=4000))
        with pytest.raises(ConfigError, match="asks for 8000 normal and 100 anomalous sessions"):
            load_demo_dataset(config)
        with pytest.raises(
            ConfigError, match=r"lower warmup_sessions \+ normal_sessions to at most"
        ):
            load_demo_dataset(config)

    def test_session_end_with_sequence_model_is_rejected(self) -> None:
        raw = {"logs": {"session_end_event": "end", "model": {"kind": "lstm_autoencoder"}}}
        with pytest.raises(ConfigError, match=r"remove logs\.session_end_event") as caught:
            parse_config(raw)
        assert "'lstm_autoencoder' scores every line" in str(caught.value)

    def test_prefix_training_with_mlp_is_rejected(self) -> None:
        raw = {"logs": {"model": {"kind": "mlp_autoencoder", "train_prefixes": True}}}
        with pytest.raises(ConfigError, match=r"logs\.model: .*remove train_prefixes"):
            parse_config(raw)

    def test_line_limit_on_sessions_is_rejected(self) -> None:
        raw = hdfs_demo()
        raw["log_demo"]["limit"] = 2000  # type: ignore[index]
        with pytest.raises(ConfigError, match=r"log_demo\.limit would cut the hdfs_sessions"):
            parse_config(raw)

    @pytest.mark.skipif(not (SESSIONS / "HDFS_sessions_deeplog").is_dir(), reason="no sessions")
    @pytest.mark.parametrize(
        ("logs", "message"),
        [
            ({"window_s": 100}, r"logs\.window_s is 100 s, but the session replay spans"),
            ({"max_lines": 2}, r"logs\.max_lines is 2, but the longest session has"),
        ],
    )
    def test_session_windows_must_hold_whole_sessions(
        self, logs: dict[str, object], message: str
    ) -> None:
        raw = hdfs_demo(warmup_sessions=30, normal_sessions=20, anomalous_sessions=5)
        raw["logs"] = {
            "window_s": 1e6,
            "session_end_event": "end",
            "model": {"kind": "mlp_autoencoder"},
            **logs,
        }
        with pytest.raises(ConfigError, match=message):
            load_demo_dataset(parse_config(raw))
