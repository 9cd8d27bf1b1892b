#!/usr/bin/env bash
# Make .venv exactly requirements/lock.txt (`make demo` and `make test` call this first).
# A venv built from another lock or pyproject is rebuilt, not reused; one changed by hand since
# it was built fails the lock check, which names the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=.venv
LOCK=requirements/lock.txt
QUIET_EDITABLE="ignore:Editable installation"  # a warnings filter (python -W syntax)
want=$(cat "$LOCK" pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$VENV/.lock-sha256" 2>/dev/null)" != "$want" ]; then
  if [ -d "$VENV" ]; then echo "rebuilding $VENV: it was built from another lock"; fi
  rm -rf "$VENV"
  "$PYTHON" -m venv "$VENV"
  # The locked pip resolves the rest; --no-build-isolation builds the project with the locked
  # setuptools instead of whatever the registry serves that day.
  "$VENV/bin/python" -m pip install -q "$(grep '^pip==' "$LOCK")"
  "$VENV/bin/python" -m pip install -q -r "$LOCK"
  # setuptools prints a 10-line "Editable installation" box on every editable build, a note for
  # package authors that reached every user of make demo; this one message, nothing else, is dropped.
  PYTHONWARNINGS="$QUIET_EDITABLE" "$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -e .
  echo "$want" > "$VENV/.lock-sha256"
fi
"$VENV/bin/python" -m unet_export.lockcheck "$LOCK"
