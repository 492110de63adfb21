"""Progress bars for long work: live on a terminal, a line every 10 s in a log file."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(*, total: int, unit: str, desc: str, enabled: bool = True) -> tqdm[Any]:
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.5 if tty else 10.0,
        dynamic_ncols=tty,
        ascii=not tty,
    )
