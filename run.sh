#!/usr/bin/env bash
# The two set-up commands of the README. Each installs what is needed into ./.venv (once; again
# when pyproject.toml changes) and then runs its job:
#   ./run.sh serve [serve flags]   start the gRPC server (CPU backend; demo model compiled on first run)
#   ./run.sh test  [pytest args]   run the test suite (what CI runs, through .ci/run)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${NEURONSERVE_VENV:-.venv}

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "run.sh: neuronserve needs Python >= 3.10 (found $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.x" >&2
  exit 1
}

install() {
  local extras=$1 stamp="$VENV/.installed-$1"
  if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then return; fi
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  echo "run.sh: installing neuronserve${extras:+[$extras]} into $VENV (first run only)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip >&2
  # The CPU build of torch, pinned: an unpinned torch pulls gigabytes of CUDA packages.
  # (On an Inf1 image, torch 1.13.1 + torch-neuron are already installed and satisfy the range.)
  "$VENV/bin/python" -c 'import torch' 2>/dev/null || "$VENV/bin/python" -m pip install -q torch==2.13.0 >&2
  "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}" >&2
  touch "$stamp"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
  serve)
    install ""
    exec "$VENV/bin/neuronserve" serve "$@"
    ;;
  test)
    install test
    exec "$VENV/bin/python" -m pytest -q "$@"
    ;;
  *)
    echo "usage: ./run.sh serve [neuronserve serve flags] | ./run.sh test [pytest args]" >&2
    exit 2
    ;;
esac
