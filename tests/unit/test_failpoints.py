"""Crash points: the spec parser and a process that kills itself at the armed count."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fanomad_stream.errors import ConfigError
from fanomad_stream.service import failpoints
from fanomad_stream.service.failpoints import parse


def test_parse_reads_names_and_counts() -> None:
    assert parse("aggregator.published=2, aggregator.folded=1") == {
        "aggregator.published": 2,
        "aggregator.folded": 1,
    }
    assert parse("") == {}


@pytest.mark.parametrize(
    "spec",
    ["aggregator.published", "aggregator.folded=0", "=3", "aggregator.folded=two", "x=\u00b2"],
)
def test_parse_refuses_malformed_entries(spec: str) -> None:
    with pytest.raises(ConfigError, match="is not name=N with N >= 1"):
        parse(spec)


def test_parse_rejects_unknown_name() -> None:
    with pytest.raises(ConfigError, match=r"unknown crash point 'aggregator\.publised'"):
        parse("aggregator.publised=1")


def test_points_list_every_crash_point() -> None:
    package = Path(failpoints.__file__).parent.parent
    called = {
        match
        for source in package.rglob("*.py")
        for match in re.findall(r"crash_point\(\"([^\"]+)\"\)", source.read_text())
    }
    assert called == failpoints.POINTS


def test_malformed_variable_is_a_cli_error() -> None:
    """The aggregator command prints the error and exits with 2 instead of a traceback."""
    script = "import sys\nfrom fanomad_stream.cli import main\nsys.exit(main(['aggregator']))\n"
    env = dict(os.environ, FANOMAD_FAILPOINTS="aggregator.published")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert "error: FANOMAD_FAILPOINTS entry 'aggregator.published'" in done.stderr
    assert "Traceback" not in done.stderr


def test_armed_point_kills_the_process_at_its_count() -> None:
    script = (
        "from fanomad_stream.service.failpoints import crash_point\n"
        "for i in range(5):\n"
        "    print(i, flush=True)\n"
        "    crash_point('aggregator.folded')\n"
    )
    env = dict(os.environ, FANOMAD_FAILPOINTS="aggregator.folded=3")
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
