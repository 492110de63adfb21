"""Named crash points, so fault trials can kill a service exactly where a crash hurts most.

A trial starts the service with ``FANOMAD_FAILPOINTS=name=N[,name=N...]``. The N-th time the
service passes ``crash_point(name)``, it kills itself with SIGKILL, as ``kill -9`` or the
kernel's OOM killer would. Without the variable, a crash point costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

import structlog

log = structlog.get_logger(__name__)

ENV_VAR = "FANOMAD_FAILPOINTS"


def parse(spec: str) -> dict[str, int]:
    """Parse ``name=N[,name=N...]`` into a map of crash point names to hit counts >= 1."""
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            msg = f"{ENV_VAR} entry {item!r} is not name=N with N >= 1, for example aggregator.published=2"
            raise ValueError(msg)
        points[name] = int(count)
    return points


_armed = parse(os.environ.get(ENV_VAR, ""))
_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when ``name`` is armed and reached its count."""
    if name not in _armed:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] >= _armed[name]:
        log.warning("failpoint_crash", point=name, hits=_hits[name])
        os.kill(os.getpid(), signal.SIGKILL)
