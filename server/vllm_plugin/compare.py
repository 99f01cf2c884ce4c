"""vLLM (with this plugin) vs our engine: greedy output on the same token ids, token for token.

Runs in the project venv; vLLM runs in its own venv (`--vllm-python`) through
`server.vllm_plugin.generate`, or is a running OpenAI server (`--server URL`, started with
`server.vllm_plugin.serve`). Both in float32, temperature 0, `ignore_eos`. A prompt passes when the
outputs are identical, or when at the first differing position our engine's top-2 logprobs are
within `--tolerance` (1e-3): a near-tie that float rounding may break either way.

    python -m server.vllm_plugin.compare CHECKPOINT --vllm-python .venv-vllm/bin/python \\
        --max-tokens 32 --json docs/results/vllm-plugin-cpu.json

Exit status 0 when every prompt passes.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# text prompts for checkpoints with a tokenizer; tokenized once, both sides get the same ids
TEXT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The theory of relativity states that",
    "To make a cup of tea, first",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "In machine learning, a transformer is",
]


def make_prompts(tokenizer, vocab_size: int, n: int, seed: int = 0) -> list[list[int]]:
    """`n` prompts: the text prompts tokenized, else seeded random ids of lengths 3..40."""
    if tokenizer is not None:
        texts = [TEXT_PROMPTS[i % len(TEXT_PROMPTS)] for i in range(n)]
        return [tokenizer(t)["input_ids"] for t in texts]
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def engine_greedy(loaded, prompts: list[list[int]], max_tokens: int, logprobs: int = 2) -> list[dict]:
    """Our engine's greedy tokens and top logprobs per position (float32, CPU)."""
    from server.engine.engine import LLMEngine
    from server.engine.types import GenerationRequest, SamplingParams

    engine = LLMEngine(loaded.config, loaded.state_dict, device="cpu", dtype=torch.float32,
                       kv_cache_bytes=64 << 20, cuda_graphs=False)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    events = engine.run_to_completion(GenerationRequest(str(i), p, params) for i, p in enumerate(prompts))
    out = []
    for i in range(len(prompts)):
        evs = [e for e in events[str(i)] if e.token_id is not None]
        out.append({"token_ids": [e.token_id for e in evs],
                    "top_logprobs": [{str(t): lp for t, lp in e.logprob.top.items()} for e in evs]})
    return out


def vllm_greedy(checkpoint: Path, prompts: list[list[int]], max_tokens: int, python: str, eager: bool,
                log_path: Path) -> dict:
    """Run `server.vllm_plugin.generate` in the vLLM venv; its report (outputs, timings, padding)."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file, out_file = Path(tmp) / "prompts.json", Path(tmp) / "out.json"
        prompts_file.write_text(json.dumps(prompts))
        cmd = [python, "-m", "server.vllm_plugin.generate", str(checkpoint), "--prompts", str(prompts_file),
               "--out", str(out_file), "--max-tokens", str(max_tokens)] + (["--eager"] if eager else [])
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
        with open(log_path, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=Path(__file__).resolve().parents[2]).returncode
        if rc != 0:
            tail = log_path.read_text()[-4000:]
            raise RuntimeError(f"vLLM generation failed (exit {rc}); log {log_path}:\n{tail}")
        return json.loads(out_file.read_text())


def server_greedy(url: str, model: str, prompts: list[list[int]], max_tokens: int, logprobs: int = 2) -> list[dict]:
    """The same greedy request through a running vLLM OpenAI server (`server.vllm_plugin.serve`)."""
    import httpx

    out = []
    for ids in prompts:
        body = {"model": model, "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "logprobs": logprobs, "return_token_ids": True, "return_tokens_as_token_ids": True}
        resp = httpx.post(f"{url.rstrip('/')}/v1/completions", json=body, timeout=600)
        resp.raise_for_status()
        choice = resp.json()["choices"][0]
        out.append({"token_ids": choice["token_ids"],  # logprob keys are "token_id:N"
                    "top_logprobs": [{k.removeprefix("token_id:"): v for k, v in top.items()}
                                     for top in choice["logprobs"]["top_logprobs"]]})
    return out


def compare_one(ours: dict, theirs: dict, tolerance: float) -> dict:
    """First difference of two greedy outputs and whether our top-2 near-tie explains it."""
    a, b = ours["token_ids"], theirs["token_ids"]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if first is None and len(a) != len(b):
        first = min(len(a), len(b))
    common = len(a) if first is None else first
    diffs = [abs(ours["top_logprobs"][i][str(a[i])] - theirs["top_logprobs"][i][str(a[i])]) for i in range(common)]
    row = {"tokens": len(a), "match": first is None, "first_diff": first,
           "max_abs_logprob_diff": max(diffs, default=0.0)}
    if first is not None and first < len(a) and first < len(b):
        top = sorted(ours["top_logprobs"][first].items(), key=lambda kv: -kv[1])
        gap = top[0][1] - top[1][1] if len(top) > 1 else float("inf")
        row.update(ours_token=a[first], vllm_token=b[first], ours_top2_gap=gap,
                   vllm_token_in_ours_top2=str(b[first]) in dict(top[:2]))
        row["explained"] = gap < tolerance and row["vllm_token_in_ours_top2"]
    row["ok"] = row["match"] or bool(row.get("explained"))
    return row


def run(checkpoint: Path, vllm_python: str | None = None, max_tokens: int = 32, num_prompts: int = 8,
        tolerance: float = 1e-3, eager: bool = False, log_path: Path | None = None, server: str | None = None,
        served_model: str | None = None) -> dict:
    """Compare on `num_prompts` prompts: vLLM offline (`vllm_python`) or a running server (`server` URL)."""
    from compressor.loading import load_modegpt

    loaded = load_modegpt(str(checkpoint), dtype=torch.float32)
    prompts = make_prompts(loaded.tokenizer, int(loaded.config["vocab_size"]), num_prompts)
    t0 = time.perf_counter()
    ours = engine_greedy(loaded, prompts, max_tokens)
    timings = {"engine_generate": round(time.perf_counter() - t0, 2)}
    if server:
        t0 = time.perf_counter()
        outputs = server_greedy(server, served_model or str(checkpoint), prompts, max_tokens)
        timings["vllm_server_generate"] = round(time.perf_counter() - t0, 2)
        vllm_side = {"vllm_path": f"OpenAI server {server}"}
    else:
        log_path = log_path or Path(tempfile.gettempdir()) / f"vllm-compare-{checkpoint.name}.log"
        theirs = vllm_greedy(checkpoint, prompts, max_tokens, vllm_python, eager, log_path)
        outputs = theirs["outputs"]
        timings.update(vllm_load=theirs["load_s"], vllm_generate=theirs["generate_s"])
        vllm_side = {"vllm_path": "vllm.LLM", "vllm_version": theirs["vllm_version"], "torch_compile": not eager,
                     "attention": theirs["attention"]}
    rows = [dict(prompt_len=len(p), **compare_one(o, t, tolerance)) for p, o, t in zip(prompts, ours, outputs)]
    return {
        "checkpoint": str(checkpoint), "source": loaded.config.get("modegpt", {}).get("source"),
        "ratio": loaded.config.get("modegpt", {}).get("ratio"), "dtype": "float32", "max_tokens": max_tokens,
        "tolerance": tolerance, **vllm_side,
        "summary": {"prompts": len(rows), "exact": sum(r["match"] for r in rows),
                    "explained_by_near_tie": sum(bool(r.get("explained")) for r in rows),
                    "failed": sum(not r["ok"] for r in rows),
                    "max_abs_logprob_diff": max(r["max_abs_logprob_diff"] for r in rows)},
        "timings_s": timings,
        "prompts": [dict(prompt_token_ids=p, ours_token_ids=o["token_ids"], vllm_token_ids=t["token_ids"],
                         **({"ours_text": loaded.tokenizer.decode(o["token_ids"])} if loaded.tokenizer else {}), **r)
                    for p, o, t, r in zip(prompts, ours, outputs, rows)],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--vllm-python", default=os.environ.get("MODEGPT_VLLM_PYTHON", ".venv-vllm/bin/python"))
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile (faster start-up)")
    ap.add_argument("--server", help="compare with a running vLLM server at this URL instead (serve.py)")
    ap.add_argument("--served-model-name", help="the model name that server serves (default: CHECKPOINT)")
    ap.add_argument("--json", type=Path, help="write the full report here")
    args = ap.parse_args(argv)
    report = run(args.checkpoint, args.vllm_python, args.max_tokens, args.num_prompts, args.tolerance, args.eager,
                 server=args.server, served_model=args.served_model_name)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    s = report["summary"]
    attention = {k: v for k, v in report.get("attention", {}).items() if k != "head_sizes"}
    print(json.dumps({"checkpoint": report["checkpoint"], "vllm_path": report["vllm_path"], **s,
                      "timings_s": report["timings_s"], **({"attention": attention} if attention else {})}))
    for i, r in enumerate(report["prompts"]):
        if not r["match"]:
            print(f"prompt {i}: first difference at {r['first_diff']}: ours {r.get('ours_token')} vs vLLM "
                  f"{r.get('vllm_token')}, our top-2 gap {r.get('ours_top2_gap')}", file=sys.stderr)
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
