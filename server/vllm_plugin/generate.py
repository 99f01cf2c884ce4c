"""Greedy generation with vLLM on token-id prompts (run in the vLLM venv; `compare` drives it).

    python -m server.vllm_plugin.generate CHECKPOINT --prompts prompts.json --max-tokens 32 --out out.json

`prompts.json` is a list of token-id lists. Writes one JSON object (vLLM logs to stdout): per prompt
the generated token ids and, per position, the top logprobs `{token_id: logprob}`; plus timings and
the attention shapes vLLM was given (head size per layer, KV-cache bytes per token padded and unpadded).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def vllm_kwargs(checkpoint: Path, dtype: str, max_model_len: int | None, eager: bool) -> dict:
    """LLM() arguments for a checkpoint dir; checkpoints without a tokenizer run on token ids only."""
    has_tokenizer = any((checkpoint / f).is_file() for f in ("tokenizer.json", "tokenizer.model"))
    kwargs = dict(model=str(checkpoint), dtype=dtype, seed=0, gpu_memory_utilization=0.4,
                  skip_tokenizer_init=not has_tokenizer, max_model_len=max_model_len)
    if eager:
        kwargs["compilation_config"] = {"mode": 0}
    return kwargs


def attention_report(config: dict, dtype: str) -> dict:
    """The padding the plugin applies for this checkpoint on this machine's attention backend."""
    import torch
    from vllm.config import VllmConfig, set_current_vllm_config

    from server.vllm_plugin.model import attention_backend
    from server.vllm_plugin.shapes import padding_report

    torch_dtype = getattr(torch, dtype)
    with set_current_vllm_config(VllmConfig()):
        backend = attention_backend(int(config["head_dim"]), torch_dtype)
    return {"backend": backend.get_name(), **padding_report(config, backend.supports_head_size, torch_dtype.itemsize)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--prompts", type=Path, required=True, help="JSON list of token-id lists")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--logprobs", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=None)
    ap.add_argument("--eager", action="store_true", help="no torch.compile (faster start-up)")
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = json.loads(args.prompts.read_text())
    t0 = time.perf_counter()
    llm = LLM(**vllm_kwargs(args.checkpoint, args.dtype, args.max_model_len, args.eager))
    t_load = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, logprobs=args.logprobs)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    t_gen = time.perf_counter() - t0
    results = []
    for out in outs:
        c = out.outputs[0]
        results.append({"token_ids": list(c.token_ids),
                        "top_logprobs": [{str(t): lp.logprob for t, lp in pos.items()} for pos in c.logprobs]})
    config = json.loads((args.checkpoint / "config.json").read_text())
    report = {"vllm_version": _vllm_version(), "load_s": round(t_load, 2), "generate_s": round(t_gen, 2),
              "attention": attention_report(config, args.dtype), "outputs": results}
    args.out.write_text(json.dumps(report))
    return 0


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


if __name__ == "__main__":
    raise SystemExit(main())
