"""EdgePrivacy on the logs and traces pipelines: clipping, DP-SGD and the ledger, offline."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fanomad_stream.config import AppConfig, parse_config
from fanomad_stream.edge.modalities import Incoming, LogsPipeline, TracesPipeline
from fanomad_stream.edge.privacy import EdgePrivacy
from fanomad_stream.featurize.trace_assembly import Span
from fanomad_stream.modalities import modality_config
from fanomad_stream.privacy.dp import SecureGaussian, update_norm
from fanomad_stream.replay.logs import LogRecord

WINDOW = 4
N_BUCKETS = 8


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logs_config(privacy: dict[str, object], kind: str = "lstm_autoencoder") -> AppConfig:
    config = parse_config(
        {
            "edge": {"window_events": 40, "threshold": {"warmup_events": 10}},
            "logs": {
                "n_buckets": N_BUCKETS,
                "window_s": 5.0,
                "model": {"kind": kind, "hidden": [8, 2], "window": WINDOW, "batch_size": 8},
            },
            "aggregator": {"quorum": 2, "clients": ["site", "other"]},
            "privacy": privacy,
        }
    )
    return modality_config(config, "logs")


def _lines(n: int, sources: int = 2) -> list[Incoming]:
    items = []
    for i in range(n):
        text = f"request {i % 3} served in {i} ms" if i % 7 else f"disk {i} failed"
        record = LogRecord(ts=1000.0 + i, source=f"node-{i % sources}", line=text, level="INFO")
        items.append(Incoming(record, i, 0, i))
    return items


def _filled_logs(config: AppConfig) -> LogsPipeline:
    pipeline = LogsPipeline(config, None)
    pipeline.process(_lines(40))
    assert pipeline.window_ready()
    return pipeline


def _filled_traces(config: AppConfig, n_traces: int = 30) -> TracesPipeline:
    pipeline = TracesPipeline(config)
    batch = []
    for t in range(n_traces):
        root = Span(f"t{t}", "r", "", "front", "GET /", int(t * 1e6), 5000 + 100 * t)
        children = [
            Span(f"t{t}", f"c{c}", "r", f"svc-{c}", "call", int(t * 1e6) + 10 + c, 1000 + c)
            for c in range(1 + t % 3)
        ]
        batch += [Incoming(span, len(batch), 0, len(batch)) for span in [root, *children]]
    pipeline.process(batch)
    pipeline.flush()
    return pipeline


def test_logs_update_clipped_under_client_dp() -> None:
    config = _logs_config({"client_dp": {"enabled": True, "clipping_norm": 0.01}})
    trained = EdgePrivacy(config, "site").train(_filled_logs(config), round_id=0)
    assert trained is not None
    assert update_norm(trained.delta) == pytest.approx(0.01, rel=1e-4)
    assert trained.privacy["mechanism"] == "dp-fedavg"
    assert trained.privacy["clipped"] is True
    assert trained.privacy["noise_added_by"] == "server"
    assert trained.n_samples > 0


def test_logs_update_noised_under_secure_aggregation() -> None:
    privacy = {
        "client_dp": {"enabled": True, "clipping_norm": 0.01, "noise_multiplier": 1.0},
        "secure_aggregation": {"enabled": True, "threshold": 2},
    }
    config = _logs_config(privacy)
    noise = SecureGaussian(test_seed=1)
    trained = EdgePrivacy(config, "site", noise=noise).train(_filled_logs(config), round_id=0)
    assert trained is not None
    assert trained.privacy["noise_added_by"] == "client_shares"
    assert trained.privacy["noise_share_std"] > 0
    # The noise share, not the clipped delta alone, sets the norm that leaves the site.
    assert update_norm(trained.delta) > 0.01


# torch.func has no batching rule for the LSTM kernel and falls back to a loop, with a warning.
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_lstm_logs_dp_sgd_recorded_in_ledger() -> None:
    config = _logs_config({"dp_sgd": {"enabled": True, "noise_multiplier": 1.1}})
    pipeline = _filled_logs(config)
    records = pipeline.training_records()
    assert records.shape == (2 * (20 - WINDOW + 1), WINDOW, N_BUCKETS + 2)
    before = pipeline.detector.weights()
    privacy = EdgePrivacy(config, "site")
    trained = privacy.train(pipeline, round_id=0)
    assert trained is not None
    assert trained.n_samples == records.shape[0]
    assert trained.privacy["dp_sgd"]["epsilon"] > 0
    assert trained.ledger is not None
    assert trained.ledger["status"] == "round"
    assert privacy.ledger is not None
    assert privacy.ledger.spent_epsilon() == pytest.approx(trained.privacy["dp_sgd"]["epsilon"])
    assert pipeline.window_ready() is False
    after = pipeline.detector.weights()
    for name in before:
        np.testing.assert_allclose(before[name] + trained.delta[name], after[name], atol=1e-6)


def test_mlp_logs_records_are_window_vectors() -> None:
    config = _logs_config({}, kind="mlp_autoencoder")
    pipeline = LogsPipeline(config, None)
    pipeline.process(_lines(40))
    records = pipeline.training_records()
    assert records.ndim == 2
    assert records.shape[1] == config.model.n_features
    assert records.shape[0] == len(pipeline.training)


def test_traces_dp_sgd_trains_on_trace_vectors() -> None:
    config = modality_config(
        parse_config(
            {
                "edge": {"window_events": 20},
                "traces": {"model": {"hidden": [8, 2], "batch_size": 8}},
                "privacy": {"dp_sgd": {"enabled": True, "noise_multiplier": 1.1}},
            }
        ),
        "traces",
    )
    pipeline = _filled_traces(config)
    assert pipeline.window_ready()
    assert pipeline.training_records().shape == (20, config.model.n_features)
    trained = EdgePrivacy(config, "site").train(pipeline, round_id=0)
    assert trained is not None
    assert trained.n_samples == 20
    assert trained.privacy["dp_sgd"]["steps"] > 0


def test_sequence_traces_keep_most_common_length() -> None:
    config = modality_config(
        parse_config(
            {
                "edge": {"window_events": 20},
                "traces": {"model": {"kind": "lstm_autoencoder", "hidden": [8, 2], "window": 3}},
            }
        ),
        "traces",
    )
    pipeline = _filled_traces(config)
    # Traces have 2, 3 or 4 spans; windows of 3 rows: 0, 1 or 2 per trace of 3 or 4 spans.
    records = pipeline.training_records()
    assert records.shape[1:] == (3, config.model.n_features)
    assert records.shape[0] == sum(max(len(rows) - 2, 0) for rows in pipeline.training)
