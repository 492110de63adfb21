"""``fanomad-stream``: one command line for every role of the system."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from fanomad_stream.broker.local import DEFAULT_PORT, LocalBroker, cache_dir, fetch_classpath
from fanomad_stream.config import AppConfig, load_config
from fanomad_stream.errors import FanomadError
from fanomad_stream.service.metrics import DEFAULT_METRICS_HOST

if TYPE_CHECKING:
    from fanomad_stream.edge.client import EdgeClient
    from fanomad_stream.edge.stream_client import ModalityEdgeClient
    from fanomad_stream.federate.aggregator import Aggregator

log = structlog.get_logger(__name__)

STREAM_DATASETS = ("bgl", "hdfs", "thunderbird", "nezha", "nezha-logs")


def _add_common(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """Add the options every command takes; on a subcommand they default to "not given"."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    # Containers set these through the environment; an option on the command line wins.
    parser.add_argument(
        "--config",
        type=Path,
        default=default(os.environ.get("FANOMAD_CONFIG")),
        help="YAML config file (default: $FANOMAD_CONFIG, else built-in defaults)",
    )
    parser.add_argument(
        "--bootstrap",
        default=default(os.environ.get("FANOMAD_BOOTSTRAP")),
        help="Kafka bootstrap servers, overriding kafka.bootstrap_servers "
        "(default: $FANOMAD_BOOTSTRAP)",
    )
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=default(False),
        help="log one JSON object per line",
    )
    parser.add_argument(
        "--log-level", default=default("INFO"), help="DEBUG, INFO, WARNING or ERROR (default INFO)"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fanomad-stream", description=__doc__)
    _add_common(parser, defaults=True)
    # The same options also work after the subcommand (`fanomad-stream demo --config X`).
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, defaults=False)
    commands = parser.add_subparsers(dest="command", required=True)

    def add_command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=help, parents=[common])

    broker = add_command("broker", help="fetch, start, check or stop the local Kafka broker")
    broker.add_argument("action", choices=["fetch", "start", "status", "stop"])
    broker.add_argument(
        "--dir", type=Path, default=None, help="run folder (default: <cache>/broker)"
    )
    broker.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"client port on 127.0.0.1 (default {DEFAULT_PORT})",
    )

    topics = add_command("topics", help="apply the topic catalog and report drift")
    topics.add_argument("action", choices=["apply"])
    topics.add_argument(
        "--catalog", type=Path, default=None, help="catalog YAML (default: topics/catalog.yaml)"
    )

    replay = add_command("replay", help="produce a recorded data set into the topics")
    replay.add_argument(
        "dataset",
        choices=["smd", *STREAM_DATASETS],
        help="smd → metrics.raw; bgl, hdfs, thunderbird, nezha-logs → logs.raw; nezha → traces.raw",
    )
    replay.add_argument("--limit", type=int, help="log lines or spans to send (default: all)")
    replay.add_argument(
        "--events-per-s",
        type=float,
        default=0.0,
        help="log lines per second (default 0: no pacing)",
    )
    replay.add_argument(
        "--pattern", help="glob of Nezha trace or log files under --data-dir (default: all)"
    )
    replay.add_argument("--machines", nargs="+", help="machine names, e.g. machine-1-2 machine-1-3")
    replay.add_argument(
        "--speed", type=float, help="0 = as fast as possible; N = N times the recorded cadence"
    )
    replay.add_argument(
        "--train-rows", type=int, help="rows of each train half to send (default: all)"
    )
    replay.add_argument(
        "--test-rows", type=int, help="rows of each test half to send (default: all)"
    )
    replay.add_argument("--data-dir", type=Path, help="folder with train/, test/ and test_label/")

    edge = add_command("edge", help="run one site's edge client until SIGTERM")
    site = os.environ.get("FANOMAD_SITE")
    edge.add_argument(
        "--site",
        default=site,
        required=site is None,
        help="client id of the site (default: $FANOMAD_SITE)",
    )
    edge.add_argument(
        "--sources",
        nargs="+",
        help="sources the site scores (default: the site id for metrics, every source for logs)",
    )

    aggregator = add_command("aggregator", help="run the aggregator until SIGTERM")
    for service in (edge, aggregator):
        service.add_argument(
            "--modality",
            choices=["metrics", "logs", "traces"],
            default="metrics",
            help="the stream and federation the service joins (default metrics)",
        )
    for service in (edge, aggregator):
        _add_metrics_options(service)

    evaluate = add_command("evaluate", help="join scores with labels, print and write the metrics")
    evaluate.add_argument(
        "--out", type=Path, help="output folder (default: output_dir of the config)"
    )
    evaluate.add_argument("--no-local", action="store_true", help="skip the local-only baseline")

    report = add_command(
        "report", help="render an HTML page and PNG plots from an evaluation's output folder"
    )
    report.add_argument(
        "--from",
        dest="evaluation_dir",
        type=Path,
        help="folder that `evaluate` wrote (default: output_dir of the config)",
    )
    report.add_argument("--out", type=Path, help="report folder (default: <from>/report)")

    add_command(
        "harness",
        help="offline SMD harness: baselines and system rows; arguments after it go to the harness",
    )

    add_command("demo", help="run the whole system once on a broker of its own")
    add_command(
        "demo-multimodal",
        help="replay Nezha as metrics, logs and traces at once on a broker of its own",
    )
    add_command(
        "demo-logs",
        help="replay a labelled LogHub sample (BGL) through the logs path on a broker of its own",
    )
    add_command("bench", help="measure consume and scoring throughput")
    return parser


def _add_metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this TCP port at /metrics (default: no endpoint)",
    )
    parser.add_argument(
        "--metrics-host",
        default=DEFAULT_METRICS_HOST,
        help=f"address the metrics endpoint binds (default {DEFAULT_METRICS_HOST}; "
        "0.0.0.0 in a container)",
    )


def _with_overrides(config: AppConfig, args: argparse.Namespace) -> AppConfig:
    if args.bootstrap:
        kafka = config.kafka.model_copy(update={"bootstrap_servers": args.bootstrap})
        config = config.model_copy(update={"kafka": kafka})
    if args.command == "replay" and args.dataset == "smd":
        updates = {
            "machines": args.machines,
            "speed": args.speed,
            "train_rows": args.train_rows,
            "test_rows": args.test_rows,
            "data_dir": args.data_dir,
        }
        replay = config.replay.model_copy(
            update={k: v for k, v in updates.items() if v is not None}
        )
        config = config.model_copy(
            update={"replay": type(config.replay).model_validate(replay.model_dump())}
        )
    return config


def _subcommand_index(parser: argparse.ArgumentParser, argv: list[str]) -> int | None:
    """Return the position of the subcommand in ``argv``: the first word that no option takes."""
    takes_value = {
        option
        for action in parser._actions
        for option in action.option_strings
        if action.nargs != 0
    }
    i = 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("-"):
            return i
        i += 2 if token in takes_value else 1
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    # Everything after the `harness` subcommand belongs to the harness's own parser. Only the
    # subcommand counts: `edge --site harness` names a site.
    harness_args: list[str] = []
    at = _subcommand_index(parser, argv)
    if at is not None and argv[at] == "harness":
        argv, harness_args = argv[: at + 1], argv[at + 1 :]
    args = parser.parse_args(argv)
    args.harness_args = harness_args
    from fanomad_stream.service.logs import configure_logging

    configure_logging(json=args.log_json, level=args.log_level)
    try:
        config = _with_overrides(load_config(args.config), args)
        return _dispatch(args, config)
    except FanomadError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, config: AppConfig) -> int:
    command = args.command
    if command == "broker":
        return _broker(args)
    if command == "topics":
        from fanomad_stream.transport.topics import apply_catalog, load_catalog

        report = asyncio.run(apply_catalog(config.kafka, load_catalog(args.catalog)))
        print(f"created: {report.created or 'none'}\nunchanged: {len(report.unchanged)}")
        for line in report.drift:
            print(f"drift: {line}")
        return 1 if report.drift else 0
    if command == "replay" and args.dataset in STREAM_DATASETS:
        return _replay_stream(args, config)
    if command == "replay":
        from fanomad_stream.replay.smd import replay_smd

        replayed = asyncio.run(replay_smd(config.kafka, config.replay))
        print(
            f"points: {replayed.points}\nlabels: {replayed.labels}\ntotal points: {replayed.total_points}"
        )
        return 0
    if command in ("edge", "aggregator"):
        return _service(args, config)
    if command == "evaluate":
        from fanomad_stream.evaluate.run import evaluate, render_markdown, write_outputs

        evaluation = asyncio.run(evaluate(config, with_local=not args.no_local))
        write_outputs(evaluation, config, args.out or config.output_dir)
        print(render_markdown(evaluation, config))
        return 0
    if command == "report":
        from fanomad_stream.evaluate.report import render_report

        page = render_report(args.evaluation_dir or config.output_dir, args.out)
        print(f"report: {page}")
        return 0
    if command == "harness":
        from fanomad_stream.evaluate.harness import main as harness_main

        return int(harness_main(args.harness_args) or 0)
    if command == "demo":
        from fanomad_stream.demo import run_demo

        return run_demo(config, args.config)
    if command == "demo-multimodal":
        from fanomad_stream.demo_multimodal import run_multimodal_demo

        return run_multimodal_demo(config)
    if command == "demo-logs":
        from fanomad_stream.demo_logs import run_log_demo

        return run_log_demo(config)
    if command == "bench":
        from fanomad_stream.bench import run_bench

        return run_bench(config)
    raise AssertionError(command)


def _replay_stream(args: argparse.Namespace, config: AppConfig) -> int:
    from fanomad_stream.replay import streams

    pattern = {"pattern": args.pattern} if args.pattern else {}
    if args.dataset == "nezha":
        spans, labels = streams.load_nezha_spans(args.data_dir, limit=args.limit, **pattern)
        report = asyncio.run(
            streams.replay_spans(config.kafka, spans, labels, speed=args.speed or 0.0)
        )
        unit = "spans"
    else:
        dataset = (
            streams.load_nezha_logs(args.data_dir, limit=args.limit, **pattern)
            if args.dataset == "nezha-logs"
            else streams.load_log_dataset(args.dataset, args.data_dir)
        )
        report = asyncio.run(
            streams.replay_logs(
                config.kafka, dataset, events_per_s=args.events_per_s, limit=args.limit
            )
        )
        unit = "lines"
    print(
        f"{unit}: {report.total_records}\nkeys: {len(report.records)}\n"
        f"labels: {report.labels}\nanomalous: {report.anomalous}"
    )
    return 0


def _broker(args: argparse.Namespace) -> int:
    broker = LocalBroker(run_dir=args.dir or cache_dir() / "broker", port=args.port)
    if args.action == "fetch":
        print(fetch_classpath())
    elif args.action == "start":
        broker.start()
        print(
            f"Kafka is up on {broker.bootstrap_servers} (pid {broker.pid()}, log {broker.log_file})"
        )
    elif args.action == "status":
        pid = broker.pid()
        ready = pid is not None and broker.is_ready()
        print(
            f"pid: {pid or 'none'}; answering metadata requests on {broker.bootstrap_servers}: {ready}"
        )
        return 0 if ready else 1
    elif broker.stop():
        print("Kafka stopped")
    else:
        print(f"no broker runs from {broker.run_dir}")
    return 0


def _service(args: argparse.Namespace, config: AppConfig) -> int:
    from fanomad_stream.modalities import modality_config, require_mlp_for_metrics
    from fanomad_stream.service.metrics import serve_metrics
    from fanomad_stream.service.runner import run_until_signalled

    service: EdgeClient | ModalityEdgeClient | Aggregator
    if args.command == "edge":
        import torch

        from fanomad_stream.edge.client import EdgeClient

        torch.set_num_threads(1)
        if args.modality == "metrics":
            require_mlp_for_metrics(config)
            service = EdgeClient(config, site=args.site, sources=args.sources or [args.site])
        else:
            from fanomad_stream.edge.stream_client import ModalityEdgeClient

            service = ModalityEdgeClient(
                modality_config(config, args.modality),
                site=args.site,
                modality=args.modality,
                sources=args.sources,
            )
        name = f"edge:{args.modality}:{args.site}"
    else:
        from fanomad_stream.federate.aggregator import Aggregator

        service = Aggregator(modality_config(config, args.modality))
        name = f"aggregator:{args.modality}"
    endpoint = None
    if args.metrics_port is not None:
        endpoint = serve_metrics(
            service.metrics.registry, port=args.metrics_port, host=args.metrics_host
        )
    try:
        asyncio.run(run_until_signalled(service, name))
    finally:
        if endpoint is not None:
            endpoint.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
