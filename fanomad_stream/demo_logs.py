"""The live log demo: a labelled LogHub sample (BGL or Thunderbird) through the logs path.

Steps: read the sample from a local LogHub copy, start a local broker of its own, apply the
topic catalog, and start in this process one logs edge client and its aggregator. Replay the
lines to ``logs.raw`` (the label token cut from each line, labels to ``labels``), wait until
the client has committed the topic to the end of the replay, stop the services, and evaluate
per line and per window of consecutive lines. The table gives the detector beside three
baselines from the same run: random scores, the HalfSpaceTrees scores the edge client sent
with each line, and the offline count-vector PCA over the same windows.

LogHub is licensed for research use only, so the project ships none of its files: the demo
reads them from ``log_demo.data_dir``, by default the copy beside the checkout.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from fanomad_stream.config import AppConfig
from fanomad_stream.demo_multimodal import (
    only_client,
    run_on_own_broker,
    running_services,
    wait_committed,
)
from fanomad_stream.edge.stream_client import ModalityEdgeClient
from fanomad_stream.errors import ConfigError
from fanomad_stream.evaluate.log_baselines import log_pca_scores
from fanomad_stream.evaluate.logs import (
    ScorerRow,
    count_windows,
    render_scorer_table,
    scorer_rows,
)
from fanomad_stream.evaluate.modalities import join_series
from fanomad_stream.federate.aggregator import Aggregator
from fanomad_stream.modalities import is_sequence, modality_config
from fanomad_stream.replay import streams
from fanomad_stream.replay.logs import LogDataset
from fanomad_stream.transport.reader import read_topic
from fanomad_stream.transport.topics import apply_catalog, load_catalog

TABLE_NOTES = """\
Lines are in replay order. A window is a run of consecutive lines. It is anomalous when any
of its lines is, scores the max of its line scores and alerts when any line alerted. A burst
is a run of consecutive anomalous lines. Random: one uniform draw per line. HST: River
HalfSpaceTrees that the edge client ran online on each line's template row. PCA: the
count-vector PCA of Xu et al. (SOSP 2009), fitted offline on every window of the replay;
each line gets its window's residual. The baselines raise no alerts, so their online F1 and
burst figures are n/a."""


@dataclass(frozen=True)
class LogDemoResult:
    """Figures of one log demo run."""

    lines: int  # lines replayed
    scored: int  # distinct lines with a score
    rows: list[ScorerRow]
    seconds: float
    global_version: int  # -1 when no round completed


def load_demo_dataset(config: AppConfig) -> LogDataset:
    """Read the configured LogHub sample, cut to ``log_demo.limit`` lines.

    With ``log_demo.single_stream`` every record's source becomes the data set's name.

    Raises ConfigError naming the folder when the LogHub copy is missing, and when
    ``logs.model`` is not a sequence model (the demo evaluates one score per line).
    """
    settings = config.log_demo
    if not is_sequence(config.logs.model):
        msg = (
            f"logs.model.kind {config.logs.model.kind!r} scores windows, but the log demo "
            "evaluates one score per line; set logs.model.kind to lstm_autoencoder or "
            "transformer_autoencoder"
        )
        raise ConfigError(msg)
    folder = settings.data_dir or streams.LOGHUB_DIR
    if not folder.is_dir():
        msg = (
            f"LogHub folder {folder} not found; set log_demo.data_dir to a local LogHub copy "
            "with BGL/BGL_2k.log or Thunderbird/Thunderbird_2k.log (the project ships none)"
        )
        raise ConfigError(msg)
    dataset = streams.load_log_dataset(settings.dataset, folder)
    records = dataset.records[: settings.limit]
    if settings.single_stream:
        records = [replace(record, source=dataset.name) for record in records]
    labels = None if dataset.labels is None else dataset.labels[: settings.limit]
    categories = None if dataset.categories is None else dataset.categories[: settings.limit]
    return LogDataset(dataset.name, records, labels, categories)


def run_log_demo(config: AppConfig) -> int:
    """Run the demo on a fresh broker; return 0 when every replayed line has a score."""
    dataset = load_demo_dataset(config)

    async def main(config: AppConfig) -> int:
        result = await replay_and_evaluate(config, dataset)
        return _report(config, dataset, result)

    return run_on_own_broker(config, main)


async def replay_and_evaluate(
    config: AppConfig, dataset: LogDataset, *, progress: bool = True
) -> LogDemoResult:
    """Replay ``dataset`` through a logs edge client and its aggregator, then evaluate.

    ``config.kafka`` must reach a running broker. Raises TimeoutError when the client has not
    committed the replay within ``log_demo.timeout_s``.
    """
    if dataset.labels is None:
        msg = f"log data set {dataset.name!r} has no labels to evaluate against"
        raise ConfigError(msg)
    await apply_catalog(config.kafka, load_catalog())
    settings = config.log_demo
    site = f"{dataset.name}-logs"
    logs_config = modality_config(config, "logs")
    client = ModalityEdgeClient(logs_config, site=site, modality="logs")
    aggregator = Aggregator(only_client(logs_config, site))
    group = f"{config.edge.group_prefix}-logs-{site}"

    began = time.monotonic()
    async with running_services(aggregator, client) as tasks:
        await streams.replay_logs(
            config.kafka, dataset, events_per_s=settings.events_per_s, progress=progress
        )
        await wait_committed(config, {group: "logs.raw"}, tasks, settings.timeout_s)
    seconds = time.monotonic() - began

    scores = await read_topic(config.kafka, "scores", frozenset({"score"}))
    labels = await read_topic(config.kafka, "labels", frozenset({"label"}))
    series = join_series(scores, labels, dataset.name, "logs")
    order = np.argsort(series.indices, kind="stable")
    indices = series.indices[order]
    if series.hst is None:
        msg = "the logs edge client sent scores without a HalfSpaceTrees score in detail.hst"
        raise RuntimeError(msg)

    window_ids = count_windows(len(dataset.records), settings.lines_per_window)
    pca = log_pca_scores(dataset.records, n_buckets=config.logs.n_buckets, window_ids=window_ids)
    rng = np.random.default_rng(config.evaluation.seed)
    scorers: dict[str, tuple[np.ndarray, np.ndarray | None]] = {
        f"{config.logs.model.kind} (online, federated)": (
            series.scores[order],
            series.alerts[order],
        ),
        "random": (np.asarray(rng.random(indices.shape[0])), None),
        "River HalfSpaceTrees (online)": (series.hst[order], None),
        "count-vector PCA (offline)": (pca[indices], None),
    }
    rows = scorer_rows(series.labels[order], window_ids[indices], scorers)
    return LogDemoResult(
        lines=len(dataset.records),
        scored=int(np.unique(indices).shape[0]),
        rows=rows,
        seconds=seconds,
        global_version=aggregator.model.version if aggregator.model else -1,
    )


def _report(config: AppConfig, dataset: LogDataset, result: LogDemoResult) -> int:
    table = render_scorer_table(result.rows)
    out_dir = config.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{dataset.name}.json").write_text(
        json.dumps([asdict(row) for row in result.rows], indent=2)
    )
    (out_dir / f"{dataset.name}.md").write_text(table + "\n\n" + TABLE_NOTES + "\n")
    print(table)
    print("\n" + TABLE_NOTES)
    print(
        f"\nScored {result.scored} of {result.lines} {dataset.name} lines in "
        f"{result.seconds:.1f} s; windows of {config.log_demo.lines_per_window} lines; "
        f"global model version: {result.global_version}."
    )
    print(f"Results: {out_dir / (dataset.name + '.md')}")
    if result.scored != result.lines:
        print(f"error: {result.lines - result.scored} lines have no score", file=sys.stderr)
        return 1
    return 0
