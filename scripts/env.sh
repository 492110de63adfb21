#!/usr/bin/env bash
# Run a command inside the project's virtual environment, creating it first if needed.
#
#   scripts/env.sh fanomad-stream demo
#   scripts/env.sh pytest -q
#
# The environment lives in the cache folder ($FANOMAD_CACHE, default ~/.cache/fanomad-stream),
# keyed by a hash of the dependency lists in pyproject.toml, so a fresh clone reuses it and a
# change of dependencies builds a new one. torch from PyPI is the CUDA build (about 3 GB); it
# runs on the CPU, and the pip cache keeps the next build quick.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${FANOMAD_CACHE:-$HOME/.cache/fanomad-stream}
python=${PYTHON:-python3}

if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: $python not found; install Python 3.11 or newer, or set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "error: $("$python" --version 2>&1) is too old; fanomad-stream needs Python 3.11 or newer (set PYTHON=...)" >&2
  exit 2
fi

key=$("$python" - "$repo/pyproject.toml" <<'PY'
import hashlib, json, sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
deps = {"deps": project["dependencies"], "extra": project.get("optional-dependencies", {})}
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:12])
PY
)
venv="$cache/venv-$key"

if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
  echo "==> creating the virtual environment in $venv (first run downloads torch, about 3 GB)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --progress-bar off -e "$repo[dev]"
  touch "$venv/.complete"
fi

# An editable install records one checkout; point it at this one when another clone ran last.
if ! "$venv/bin/python" - "$repo" <<'PY'
import pathlib, sys
import fanomad_stream
sys.exit(pathlib.Path(fanomad_stream.__file__).resolve().parents[1] != pathlib.Path(sys.argv[1]).resolve())
PY
then
  "$venv/bin/pip" install --quiet --no-deps -e "$repo"
fi

export PATH="$venv/bin:$PATH"
export VIRTUAL_ENV="$venv"
cd "$repo"
exec "$@"
