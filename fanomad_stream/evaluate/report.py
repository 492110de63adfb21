"""``fanomad-stream report``: one self-contained HTML page and PNG files from an evaluation.

The page inlines every plot as a base64 PNG and uses no external style sheet, script or font,
so it can be mailed or archived as a single file and opened offline. The same plots are
written beside it as PNG files.

Inputs are the files ``fanomad-stream evaluate`` writes into its output folder:
``evaluation.json`` (metrics), ``series.npz`` (per-source series) and ``rounds.json``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from matplotlib.figure import Figure

from fanomad_stream.errors import FanomadError
from fanomad_stream.evaluate import plots
from fanomad_stream.evaluate.series import ROUNDS_FILE, SERIES_FILE, load_rounds, load_series

log = structlog.get_logger(__name__)

REPORT_FILE = "report.html"
DPI = 110
METRIC_COLUMNS = (
    ("auroc", "AUROC"),
    ("pr_auc", "PR-AUC"),
    ("best_f1", "best F1 (threshold picked on labels)"),
    ("f1_operating", "F1 at the operating threshold"),
    ("pa_f1", "point-adjusted F1 (inflated, for comparison only)"),
)


class ReportError(FanomadError):
    """The evaluation files needed for the report are missing or unreadable."""


@dataclass(frozen=True)
class Plot:
    """One rendered figure: its file name, caption and PNG bytes."""

    name: str
    caption: str
    png: bytes


def render_report(evaluation_dir: Path, out_dir: Path | None = None) -> Path:
    """Write ``report.html`` and one PNG per plot into ``out_dir``; return the HTML path.

    ``out_dir`` defaults to ``<evaluation_dir>/report``. Raises ReportError when
    ``evaluation.json`` or ``series.npz`` is missing. A missing ``rounds.json`` only leaves the
    rounds plot empty.
    """
    out_dir = out_dir or evaluation_dir / "report"
    evaluation = _read_evaluation(evaluation_dir)
    series_path = evaluation_dir / SERIES_FILE
    if not series_path.exists():
        msg = f"{series_path} not found; run `fanomad-stream evaluate` with this version first"
        raise ReportError(msg)
    series = load_series(series_path)
    rounds_path = evaluation_dir / ROUNDS_FILE
    rounds = load_rounds(rounds_path) if rounds_path.exists() else []

    rendered = [
        *(
            _render(
                f"timeline-{_file_safe(source)}",
                f"{source}: scores in event order. Shaded: labelled anomalies. "
                "Dashed: the alert threshold, fitted on past scores only (blank during warm-up). "
                "Red points: alerts.",
                plots.timeline_figure(source, arrays),
            )
            for source, arrays in sorted(series.items())
        ),
        _render(
            "roc", "ROC curves over the labelled rows of all sources.", plots.roc_figure(series)
        ),
        _render(
            "pr",
            "Precision-recall curves over the labelled rows of all sources; dashed: anomaly rate.",
            plots.pr_figure(series),
        ),
        _render(
            "calibration",
            "Observed anomaly rate per score-rank decile of the system score, per source.",
            plots.calibration_figure(evaluation.get("per_source", {})),
        ),
        _render(
            "rounds",
            "Per federated round: mean training loss the clients reported, clients folded, "
            "and epsilon spent where privacy accounting ran.",
            plots.rounds_figure(rounds),
        ),
    ]

    out_dir.mkdir(parents=True, exist_ok=True)
    for plot in rendered:
        (out_dir / f"{plot.name}.png").write_bytes(plot.png)
    page = out_dir / REPORT_FILE
    page.write_text(_html_page(evaluation, rendered, evaluation_dir), encoding="utf-8")
    log.info("report_written", path=str(page), plots=len(rendered), sources=len(series))
    return page


def _read_evaluation(evaluation_dir: Path) -> dict[str, Any]:
    path = evaluation_dir / "evaluation.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as err:
        msg = f"{path} not found; run `fanomad-stream evaluate --out {evaluation_dir}` first"
        raise ReportError(msg) from err
    except json.JSONDecodeError as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from err
    return data


def _render(name: str, caption: str, figure: Figure) -> Plot:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return Plot(name=name, caption=caption, png=buffer.getvalue())


def _file_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def _number(value: object) -> str:
    if isinstance(value, int | float) and math.isfinite(value):
        return f"{value:.3f}"
    return "n/a"


def _metrics_table(evaluation: dict[str, Any]) -> str:
    header = "".join(f"<th>{html.escape(title)}</th>" for _, title in METRIC_COLUMNS)
    rows = []
    for detector, values in evaluation.get("mean", {}).items():
        if all(not _is_finite(values.get(key)) for key, _ in METRIC_COLUMNS):
            continue  # a baseline that did not run (for example `local` with --no-local)
        cells = "".join(f"<td>{_number(values.get(key))}</td>" for key, _ in METRIC_COLUMNS)
        rows.append(f"<tr><th>{html.escape(detector)}</th>{cells}</tr>")
    return f"<table><tr><th>detector</th>{header}</tr>{''.join(rows)}</table>"


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _figure_class(name: str) -> str:
    # Square plots sit side by side; timelines and the rounds strip take the full width.
    return "square" if name in ("roc", "pr", "calibration") else "wide"


def _html_page(evaluation: dict[str, Any], rendered: list[Plot], source_dir: Path) -> str:
    figures = "\n".join(
        f'<figure id="{html.escape(plot.name)}" class="{_figure_class(plot.name)}">'
        f'<img alt="{html.escape(plot.caption)}" '
        f'src="data:image/png;base64,{base64.b64encode(plot.png).decode()}">'
        f"<figcaption>{html.escape(plot.caption)}</figcaption></figure>"
        for plot in rendered
    )
    created = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    summary = (
        f"Sources: {len(evaluation.get('per_source', {}))}; scores read: "
        f"{evaluation.get('scores_total', 'n/a')}; labels read: "
        f"{evaluation.get('labels_total', 'n/a')}. Metrics are point-wise on labelled rows, "
        "averaged over sources."
    )
    return _PAGE.format(
        title="fanomad-stream evaluation report",
        created=created,
        source=html.escape(str(source_dir)),
        summary=html.escape(summary),
        table=_metrics_table(evaluation),
        figures=figures,
        count=len(rendered),
    )


# The script only checks that the browser decoded every inlined image. It writes the count
# into data-images-decoded on <body> and shows a warning when an image is broken.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
tr > th:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }}
figure.square {{ display: inline-block; vertical-align: top; width: 32%; margin-right: 1%; }}
img {{ max-width: 100%; }}
figcaption {{ color: #555; font-size: 0.9em; }}
#broken {{ display: none; background: #fdd; padding: 0.5em; }}
</style>
</head>
<body data-images-expected="{count}">
<h1>{title}</h1>
<p id="broken">Some plots failed to load.</p>
<p>Created {created} from <code>{source}</code>. {summary}</p>
<h2>Metrics (mean over sources)</h2>
{table}
<h2>Plots</h2>
{figures}
<script>
window.addEventListener("load", function () {{
  var images = Array.from(document.images);
  var decoded = images.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }});
  document.body.dataset.imagesDecoded = String(decoded.length);
  if (decoded.length !== images.length) {{
    document.getElementById("broken").style.display = "block";
  }}
}});
</script>
</body>
</html>
"""
