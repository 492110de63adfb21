"""Crash points: the spec parser and a process that kills itself at the armed count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from fanomad_stream.service.failpoints import parse


def test_parse_reads_names_and_counts() -> None:
    assert parse("aggregator.published=2, edge.sent=1") == {
        "aggregator.published": 2,
        "edge.sent": 1,
    }
    assert parse("") == {}


@pytest.mark.parametrize("spec", ["aggregator.published", "x=0", "=3", "x=two"])
def test_parse_refuses_malformed_entries(spec: str) -> None:
    with pytest.raises(ValueError, match="is not name=N with N >= 1"):
        parse(spec)


def test_armed_point_kills_the_process_at_its_count() -> None:
    script = (
        "from fanomad_stream.service.failpoints import crash_point\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    crash_point('demo.step')\n"
    )
    env = dict(os.environ, FANOMAD_FAILPOINTS="demo.step=3")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    steps = [line for line in done.stdout.splitlines() if line.isdigit()]
    assert (done.returncode, steps) == (-signal.SIGKILL, ["0", "1", "2"])
    assert "failpoint_crash" in done.stdout

    env.pop("FANOMAD_FAILPOINTS")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout.split()) == (0, ["0", "1", "2", "3", "4"])
