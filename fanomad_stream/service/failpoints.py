"""Named crash points, so fault trials can kill a service exactly where a crash hurts most.

A trial starts the service with ``FANOMAD_FAILPOINTS=name=N[,name=N...]``. The N-th time the
service passes ``crash_point(name)``, it kills itself with SIGKILL, as ``kill -9`` or the
kernel's OOM killer would. Without the variable, a crash point costs one dictionary lookup.
A malformed value or an unknown name raises ConfigError when this module is imported, so a
typo cannot make a trial pass without ever crashing.
"""

from __future__ import annotations

import os
import signal

import structlog

from fanomad_stream.errors import ConfigError

log = structlog.get_logger(__name__)

ENV_VAR = "FANOMAD_FAILPOINTS"
# Every name passed to crash_point in the package.
POINTS = frozenset({"aggregator.folded", "aggregator.published", "aggregator.committed"})


def parse(spec: str, known: frozenset[str] = POINTS) -> dict[str, int]:
    """Parse ``name=N[,name=N...]`` into a map of crash point names to hit counts >= 1.

    Raises ConfigError on a malformed entry or a name that is not in ``known``.
    """
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, count = item.partition("=")
        if not sep or not name or not count.isdecimal() or int(count) < 1:
            msg = f"{ENV_VAR} entry {item!r} is not name=N with N >= 1, for example aggregator.published=2"
            raise ConfigError(msg)
        if name not in known:
            msg = f"{ENV_VAR} names the unknown crash point {name!r}; known points: {sorted(known)}"
            raise ConfigError(msg)
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
