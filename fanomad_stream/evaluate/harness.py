"""Offline SMD evaluation harness: every detector on the same splits, several seeds.

The run has two phases. ``score_all`` fits and scores every detector from the unlabelled
series only and fixes each test row's alert threshold. ``evaluate_all`` then reads the test
labels, for the first time, and computes the point-wise metrics. Nothing computed from labels
flows back into a score or a threshold, because scoring is finished before labels are read.

Run it with ``python scripts/smd_harness.py --data-dir PATH`` or call ``main(argv)``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fanomad_stream.evaluate.baselines import BASELINES, Scorer, ScoreSet
from fanomad_stream.evaluate.metrics import evaluate_scores
from fanomad_stream.evaluate.smd import MACHINES, MachineSeries, load_series, load_test_labels
from fanomad_stream.evaluate.system import SYSTEM_ROWS

METRICS = ("auroc", "pr_auc", "best_f1", "f1_operating")
LabelLoader = Callable[[str, int], np.ndarray]


@dataclass(frozen=True)
class RowResult:
    """Metrics of one detector: ``per_seed[seed][metric]`` is the mean over machines."""

    name: str
    per_seed: dict[int, dict[str, float]]
    per_machine: dict[int, dict[str, dict[str, float]]]
    seconds: float

    def mean(self, metric: str) -> float:
        return float(np.mean([values[metric] for values in self.per_seed.values()]))

    def spread(self, metric: str) -> float:
        """Standard deviation over seeds of the 7-machine mean (0 for one seed)."""
        return float(np.std([values[metric] for values in self.per_seed.values()]))


def score_all(
    scorers: Mapping[str, Scorer], series: Mapping[str, MachineSeries], seeds: Sequence[int]
) -> tuple[dict[str, dict[int, dict[str, ScoreSet]]], dict[str, float]]:
    """Run every scorer for every seed; return scores[name][seed][machine] and seconds per row."""
    scores: dict[str, dict[int, dict[str, ScoreSet]]] = {}
    seconds: dict[str, float] = {}
    for name, scorer in scorers.items():
        start = time.perf_counter()
        scores[name] = {seed: scorer(series, seed) for seed in seeds}
        seconds[name] = time.perf_counter() - start
        for machine_scores in scores[name].values():
            _check_shapes(name, machine_scores, series)
    return scores, seconds


def _check_shapes(
    name: str, scores: Mapping[str, ScoreSet], series: Mapping[str, MachineSeries]
) -> None:
    for machine, s in series.items():
        score_set = scores[machine]
        if score_set.test_scores.shape != (len(s.test),) or score_set.test_thresholds.shape != (
            len(s.test),
        ):
            msg = (
                f"scorer {name!r} returned {score_set.test_scores.shape} test scores and "
                f"{score_set.test_thresholds.shape} thresholds for {machine}, "
                f"expected ({len(s.test)},)"
            )
            raise ValueError(msg)


def evaluate_all(
    scores: Mapping[str, Mapping[int, Mapping[str, ScoreSet]]],
    seconds: Mapping[str, float],
    load_labels: LabelLoader,
    test_rows: Mapping[str, int],
) -> list[RowResult]:
    """Read the test labels and compute point-wise metrics of every fixed score set."""
    labels = {machine: load_labels(machine, n) for machine, n in test_rows.items()}
    rows = []
    for name, by_seed in scores.items():
        per_seed: dict[int, dict[str, float]] = {}
        per_machine: dict[int, dict[str, dict[str, float]]] = {}
        for seed, by_machine in by_seed.items():
            per_machine[seed] = {}
            for machine, s in by_machine.items():
                decisions = s.test_scores > s.test_thresholds
                metrics = evaluate_scores(labels[machine], s.test_scores, decisions).as_dict()
                per_machine[seed][machine] = {key: float(metrics[key]) for key in METRICS}
            per_seed[seed] = {
                key: float(np.mean([m[key] for m in per_machine[seed].values()])) for key in METRICS
            }
        rows.append(RowResult(name, per_seed, per_machine, seconds[name]))
    return rows


def format_table(rows: Sequence[RowResult]) -> str:
    """Render rows as a Markdown table of mean ± standard deviation over seeds."""
    lines = [
        "| detector | AUROC | PR-AUC | best F1 | F1 at operating threshold | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [f"{row.mean(key):.3f} ± {row.spread(key):.3f}" for key in METRICS]
        lines.append(f"| {row.name} | {' | '.join(cells)} | {row.seconds:.0f} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class HeldOutChoice:
    """The row chosen on every machine but ``machine``, and its metric on ``machine``."""

    machine: str
    chosen: str
    held_out: float
    best_on_machine: float


def leave_one_machine_out(rows: Sequence[RowResult], metric: str) -> list[HeldOutChoice]:
    """Choose a row on all machines but one and report it on that one, for every machine.

    A row's value on a set of machines is its metric averaged over those machines and over
    the seeds. Ties go to the row that comes first in ``rows``. ``best_on_machine`` is the
    highest value any row reaches on the held-out machine, which needs that machine's labels.
    """
    if not rows:
        msg = "leave-one-machine-out needs at least one row"
        raise ValueError(msg)
    if metric not in METRICS:
        msg = f"unknown metric {metric!r}; choose one of {METRICS}"
        raise ValueError(msg)
    machines = sorted(next(iter(rows[0].per_machine.values())))

    def value(row: RowResult, keep: Sequence[str]) -> float:
        return float(np.mean([[by[m][metric] for m in keep] for by in row.per_machine.values()]))

    choices = []
    for held_out in machines:
        others = [m for m in machines if m != held_out]
        chosen = max(rows, key=lambda row: value(row, others))
        choices.append(
            HeldOutChoice(
                held_out,
                chosen.name,
                value(chosen, [held_out]),
                max(value(row, [held_out]) for row in rows),
            )
        )
    return choices


def format_held_out(rows: Sequence[RowResult], metric: str) -> str:
    """Render the leave-one-machine-out choices as a Markdown table with the mean last."""
    choices = leave_one_machine_out(rows, metric)
    on_all = max(rows, key=lambda row: row.mean(metric))
    lines = [
        f"| held-out machine | row chosen on the other machines | {metric} held out | "
        f"best row on the machine | {on_all.name} (chosen on all) |",
        "|---|---|---|---|---|",
    ]
    for choice in choices:
        own = float(np.mean([by[choice.machine][metric] for by in on_all.per_machine.values()]))
        lines.append(
            f"| {choice.machine} | {choice.chosen} | {choice.held_out:.3f} | "
            f"{choice.best_on_machine:.3f} | {own:.3f} |"
        )
    mean = np.mean([c.held_out for c in choices])
    best = np.mean([c.best_on_machine for c in choices])
    lines.append(f"| mean | | {mean:.3f} | {best:.3f} | {on_all.mean(metric):.3f} |")
    return "\n".join(lines)


def run(
    data_dir: Path,
    scorers: Mapping[str, Scorer],
    seeds: Sequence[int],
    machines: Sequence[str] = MACHINES,
) -> list[RowResult]:
    """Score every detector on ``machines``, then evaluate against the test labels."""
    series = {machine: load_series(data_dir, machine) for machine in machines}
    scores, seconds = score_all(scorers, series, seeds)
    test_rows = {machine: len(s.test) for machine, s in series.items()}
    return evaluate_all(scores, seconds, lambda m, n: load_test_labels(data_dir, m, n), test_rows)


def all_rows() -> dict[str, Scorer]:
    """Return the baseline rows followed by the system's own rows, by table name."""
    return {**BASELINES, **SYSTEM_ROWS}


def load_results(path: Path) -> list[RowResult]:
    """Read the rows that ``--json`` wrote to ``path``."""
    payload = json.loads(path.read_text())
    return [
        RowResult(
            item["name"],
            {int(seed): values for seed, values in item["per_seed"].items()},
            {int(seed): values for seed, values in item["per_machine"].items()},
            float(item["seconds"]),
        )
        for item in payload
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate detectors on the SMD machines.")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="SMD folder with train/, test/, test_label/"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each row runs once per seed"
    )
    parser.add_argument(
        "--rows", nargs="+", default=None, help="row names to run (default: all); see --list"
    )
    parser.add_argument(
        "--machines", nargs="+", default=list(MACHINES), help="machine names to use"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write per-seed and per-machine metrics here"
    )
    parser.add_argument(
        "--held-out",
        choices=METRICS,
        default=None,
        help="also choose a row by this metric on 6 machines and report it on the 7th",
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="read rows from files that --json wrote instead of scoring (with --held-out)",
    )
    parser.add_argument("--list", action="store_true", help="print the row names and exit")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: fast on a shared machine)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the harness from the command line and print the Markdown table."""
    args = build_parser().parse_args(argv)
    rows = all_rows()
    if args.list:
        print("\n".join(rows))
        return 0
    if args.rows is not None:
        unknown = [name for name in args.rows if name not in rows]
        if unknown:
            msg = f"unknown rows {unknown}; run with --list to see the row names"
            raise SystemExit(msg)
        rows = {name: rows[name] for name in args.rows}
    if args.from_json is not None:
        results = [
            row
            for path in args.from_json
            for row in load_results(path)
            if args.rows is None or row.name in rows
        ]
        print(format_table(results))
        if args.held_out is not None:
            print()
            print(format_held_out(results, args.held_out))
        return 0
    if args.data_dir is None:
        msg = "--data-dir is required unless --from-json is given"
        raise SystemExit(msg)
    # Several intra-op threads spin against each other when other processes load the CPU.
    torch.set_num_threads(args.threads)
    results = run(args.data_dir, rows, args.seeds, args.machines)
    print(f"seeds {args.seeds}, machines {args.machines}, point-wise metrics, mean over machines")
    print(format_table(results))
    if args.held_out is not None:
        print()
        print(format_held_out(results, args.held_out))
    if args.json is not None:
        payload = [
            {
                "name": r.name,
                "per_seed": r.per_seed,
                "per_machine": r.per_machine,
                "seconds": r.seconds,
            }
            for r in results
        ]
        args.json.write_text(json.dumps(payload, indent=1))
    return 0
