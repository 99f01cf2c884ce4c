"""Offline vLLM throughput of one model directory (a ModeGPT checkpoint or a plain HF model).

Run in the vLLM venv:

    python -m server.vllm_plugin.bench MODEL_DIR --num-prompts 32 --input-len 64 --output-len 64 --out r.json

Seeded random token-id prompts, greedy, `ignore_eos`; one untimed warm-up batch first. Reports output
and total tokens/s, the KV-cache capacity vLLM allocated (blocks, tokens) and, for a ModeGPT
checkpoint, the head sizes its layers run with and the KV bytes per token padded vs unpadded.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from server.vllm_plugin.generate import attention_report, vllm_kwargs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--eager", action="store_true", help="no torch.compile")
    args = ap.parse_args(argv)

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    config = json.loads((args.model / "config.json").read_text())
    t0 = time.perf_counter()
    llm = LLM(**vllm_kwargs(args.model, args.dtype, args.max_model_len, args.eager))
    load_s = time.perf_counter() - t0
    rng = random.Random(0)
    vocab = int(config["vocab_size"])
    prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(vocab) for _ in range(args.input_len)])
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    cache = llm.llm_engine.vllm_config.cache_config
    report = {
        "model": str(args.model), "architecture": config.get("architectures", ["?"])[0], "dtype": args.dtype,
        "torch_compile": not args.eager, "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len, "load_s": round(load_s, 2), "wall_s": round(wall, 3),
        "output_tokens_per_s": round(n_out / wall, 2),
        "total_tokens_per_s": round((n_out + args.num_prompts * args.input_len) / wall, 2),
        "kv_cache_blocks": cache.num_gpu_blocks, "kv_cache_block_size": cache.block_size,
        "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size,
    }
    if config.get("model_type") == "modegpt":
        report["attention"] = attention_report(config, args.dtype)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
