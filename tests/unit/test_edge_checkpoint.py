"""The edge checkpoint: a restored pipeline continues bit for bit, and bad files are rejected."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from aiokafka import TopicPartition

from fanomad_stream.config import AppConfig, parse_config
from fanomad_stream.edge.checkpoint import (
    CheckpointLock,
    CheckpointRejectedError,
    EdgeCheckpoint,
    read_checkpoint,
    state_fingerprint,
    write_checkpoint,
)
from fanomad_stream.edge.client import EdgeClient
from fanomad_stream.edge.pipeline import EdgePipeline
from fanomad_stream.edge.site_state import SiteState

N_FEATURES = 6
SOURCES = ("m-1", "m-2")
BATCH = 100
BATCHES = 24  # per source


def _config(scoring: str, **edge: object) -> AppConfig:
    settings: dict[str, object] = {
        "scoring": scoring,
        "window_events": 700,
        "hst_trees": 4,
        "hst_height": 5,
        "hst_window": 50,
        "threshold": {"warmup_events": 150, "history": 400},
        "context": {"warmup_rows": 600, "spot_warmup": 500},
    }
    settings.update(edge)
    return parse_config(
        {
            "model": {"n_features": N_FEATURES, "hidden": [4], "local_epochs": 1, "seed": 3},
            "edge": settings,
        }
    )


def _batches() -> list[tuple[str, np.ndarray]]:
    """Return the batches of both sources in arrival order, with spikes that raise alerts."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(BATCHES):
        for s, source in enumerate(SOURCES):
            t = np.arange(i * BATCH, (i + 1) * BATCH)[:, None]
            base = 0.5 + 0.2 * np.sin(t / (15.0 + s) + np.arange(N_FEATURES))
            values = base + rng.normal(0.0, 0.02, size=(BATCH, N_FEATURES))
            if i >= 10 and i % 3 == 0:
                values[BATCH // 2 : BATCH // 2 + 5, s] += 1.5  # a short level shift
            out.append((source, values.astype(np.float32)))
    return out


def _pipeline(config: AppConfig) -> EdgePipeline:
    return EdgePipeline(config.model.n_features, config.edge, config.model)


def _run(pipeline: EdgePipeline, batches: list[tuple[str, np.ndarray]]) -> list[object]:
    """Process batches as the edge client does (train when a window is ready); return outputs."""
    outputs: list[object] = []
    for source, values in batches:
        result = pipeline.process(source, values)
        outputs.append(("scores", source, result.score, result.threshold, result.alert))
        if pipeline.window_ready():
            delta, n_samples = pipeline.train_window()
            outputs.append(("delta", n_samples, delta))
    return outputs


def _checkpoint(config: AppConfig, pipeline: EdgePipeline) -> EdgeCheckpoint:
    return EdgeCheckpoint(
        site="site-a",
        fingerprint=state_fingerprint(config),
        global_version=3,
        last_update_round=2,
        offsets={TopicPartition("metrics.raw", 1): 1200, TopicPartition("metrics.raw", 3): 1100},
        pipeline=pipeline.snapshot(),
        written_at=1.0,
    )


def _assert_equal_outputs(expected: list[object], actual: list[object]) -> None:
    assert len(actual) == len(expected)
    for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert isinstance(want, tuple) and isinstance(got, tuple)
        assert want[0] == got[0], f"output {i}: {got[0]} where {want[0]} was expected"
        if want[0] == "scores":
            assert want[1] == got[1], f"output {i}: source"
            for column in (2, 3, 4):
                assert np.array_equal(want[column], got[column]), f"output {i}, column {column}"
        else:
            assert want[1] == got[1], f"output {i}: n_samples"
            assert want[2].keys() == got[2].keys()
            for name in want[2]:
                assert np.array_equal(want[2][name], got[2][name]), f"output {i}: delta {name}"


@pytest.mark.parametrize("scoring", ["context", "baseline"])
def test_restored_pipeline_continues_bitwise(tmp_path: Path, scoring: str) -> None:
    """Scores, thresholds, alerts and trained deltas after a restore equal an unbroken run."""
    config = _config(scoring)
    batches = _batches()
    # Stop mid-window: 15 batches per source is 3000 rows, 4 windows of 700 and 200 rows more.
    split = 2 * 15

    unbroken = _run(_pipeline(config), batches)

    first = _pipeline(config)
    before = _run(first, batches[:split])
    assert first.events_since_training == 200
    path = tmp_path / "site-a" / "checkpoint.bin"
    write_checkpoint(path, _checkpoint(config, first))
    restored = _pipeline(config)
    checkpoint = read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    restored.restore(checkpoint.pipeline)
    after = _run(restored, batches[split:])

    _assert_equal_outputs(unbroken, before + after)
    trained_after = [o for o in after if isinstance(o, tuple) and o[0] == "delta"]
    assert len(trained_after) >= 2
    alerts_after = sum(int(o[4].sum()) for o in after if isinstance(o, tuple) and o[0] == "scores")
    assert alerts_after > 0
    last_thresholds = [o[3] for o in after if isinstance(o, tuple) and o[0] == "scores"]
    assert np.isfinite(last_thresholds[0]).all()


def test_checkpoint_header_round_trip(tmp_path: Path) -> None:
    config = _config("baseline")
    pipeline = _pipeline(config)
    _run(pipeline, _batches()[:4])
    path = tmp_path / "site-a" / "checkpoint.bin"
    write_checkpoint(path, _checkpoint(config, pipeline))
    checkpoint = read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert checkpoint.global_version == 3
    assert checkpoint.last_update_round == 2
    assert checkpoint.offsets == {
        TopicPartition("metrics.raw", 1): 1200,
        TopicPartition("metrics.raw", 3): 1100,
    }
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(path.parent).st_mode & 0o777 == 0o700


def test_fingerprint_ignores_operational_settings() -> None:
    base = state_fingerprint(_config("context"))
    assert state_fingerprint(_config("context", poll_timeout_ms=900, stop_timeout_s=3)) == base
    assert state_fingerprint(_config("context", checkpoint_interval_s=5)) == base
    assert state_fingerprint(_config("context", window_events=800)) != base
    assert state_fingerprint(_config("baseline")) != base


def _written(tmp_path: Path) -> tuple[AppConfig, Path]:
    config = _config("baseline")
    pipeline = _pipeline(config)
    _run(pipeline, _batches()[:2])
    path = tmp_path / "site-a" / "checkpoint.bin"
    write_checkpoint(path, _checkpoint(config, pipeline))
    return config, path


def test_checkpoint_of_other_config_rejected(tmp_path: Path) -> None:
    _, path = _written(tmp_path)
    other = state_fingerprint(_config("baseline", window_events=900))
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=other)
    assert raised.value.reason == "config"


def test_checkpoint_of_other_site_rejected(tmp_path: Path) -> None:
    config, path = _written(tmp_path)
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-b", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "site"


def test_checkpoint_of_other_format_rejected(tmp_path: Path) -> None:
    config, path = _written(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"format": 1', b'"format": 99', 1))
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "format"


def test_changed_payload_rejected(tmp_path: Path) -> None:
    config, path = _written(tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "corrupt"


def test_truncated_checkpoint_rejected(tmp_path: Path) -> None:
    config, path = _written(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "corrupt"


def test_group_writable_checkpoint_rejected(tmp_path: Path) -> None:
    """A pickle that another user could have written is never loaded."""
    config, path = _written(tmp_path)
    path.chmod(0o620)
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "permissions"
    path.chmod(0o600)
    path.parent.chmod(0o777)
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "permissions"


def test_checkpoint_lock_is_exclusive(tmp_path: Path) -> None:
    """A second holder of a site's lock is turned away until the first releases it."""
    first = CheckpointLock(tmp_path / "site-a")
    second = CheckpointLock(tmp_path / "site-a")
    assert first.acquire()
    assert not second.acquire()
    assert not second.held
    first.release()
    assert second.acquire()
    second.release()


def _rewrite(path: Path, payload: bytes | None = None, **header: object) -> None:
    """Replace the header fields and payload of a checkpoint, with a matching SHA-256."""
    data = path.read_bytes()
    end = data.index(b"\n")
    fields = json.loads(data[:end])
    body = data[end + 1 :] if payload is None else payload
    fields.update(header)
    fields["payload_bytes"] = len(body)
    fields["payload_sha256"] = hashlib.sha256(body).hexdigest()
    path.write_bytes(json.dumps(fields).encode() + b"\n" + body)


@pytest.mark.parametrize(
    "payload",
    # Bytes that are no pickle, and a pickle of a class that does not exist (a renamed one).
    [b"not a pickle", b"cfanomad_stream.edge.pipeline\nRenamedPipeline\n."],
)
def test_unloadable_payload_rejected(tmp_path: Path, payload: bytes) -> None:
    """A payload whose digest matches but that fails to unpickle is rejected, not raised."""
    config, path = _written(tmp_path)
    _rewrite(path, payload)
    with pytest.raises(CheckpointRejectedError) as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "unpickle"


def test_negative_offset_rejected(tmp_path: Path) -> None:
    config, path = _written(tmp_path)
    _rewrite(path, offsets=[["metrics.raw", 0, -5]])
    with pytest.raises(CheckpointRejectedError, match="negative offsets") as raised:
        read_checkpoint(path, site="site-a", fingerprint=state_fingerprint(config))
    assert raised.value.reason == "corrupt"


def test_restore_of_partial_state_changes_nothing() -> None:
    config = _config("baseline")
    pipeline = _pipeline(config)
    _run(pipeline, _batches()[:2])
    before = pipeline.snapshot()
    state = dict(before)
    del state["window"]
    fresh = _pipeline(config)
    with pytest.raises(KeyError):
        fresh.restore(state)
    assert fresh.sources == {}
    assert fresh.detector is not before["detector"]


def test_client_with_unusable_state_dir_goes_on(tmp_path: Path) -> None:
    """A state_dir below a regular file costs the checkpoint and site state, not the client."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = _config("baseline", state_dir=str(blocker / "state"))
    client = EdgeClient(config, site="site-a", sources=list(SOURCES))
    assert client.checkpoints.read() is None
    client.rounds.write(SiteState(last_update_round=4))
    assert client.rounds.read() == SiteState()


def test_client_skips_unfit_checkpoint_state(tmp_path: Path) -> None:
    config = _config("baseline")
    client = EdgeClient(config, site="site-a", sources=list(SOURCES))
    checkpoint = _checkpoint(config, _pipeline(config))
    checkpoint.pipeline = {"detector": checkpoint.pipeline["detector"]}
    assert not client._restore(checkpoint)
    assert client.checkpoints.restored is None
    assert client.checkpoints.positions == {}
