#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv (CPU torch, never a CUDA build), installs
# sara-network with every extra, then runs what you ask. SARA_VENV names another venv folder;
# SARA_CONSTRAINTS a pip constraints file for its install (.ci/kohya-pins.txt: kohya's versions).
#   bash tools/run.sh demo [args]   the main job: SaRA fine-tune of the embedded digits model
#   bash tools/run.sh tests [args]  the test suite
#   bash tools/run.sh sara  [args]  the `sara` command line
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SARA_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import sara_network, diffusers, pytest" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0           # the CPU wheel; install torch first so nothing pulls CUDA
  "$VENV/bin/pip" install -q ${SARA_CONSTRAINTS:+-c "$SARA_CONSTRAINTS"} -e ".[all,test]"
fi
what=${1:-tests}; shift || true
case "$what" in
  demo)  exec "$VENV/bin/python" -m sara_network.demo "$@" ;;
  tests) exec "$VENV/bin/python" -m pytest -q "$@" ;;
  sara)  exec "$VENV/bin/sara" "$@" ;;
  *) echo "usage: bash tools/run.sh {demo|tests|sara} [args]" >&2; exit 2 ;;
esac
