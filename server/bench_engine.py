"""``modegpt bench engine``: offline prefill and decode throughput per model and batch size, in one run.

Every model (a MODEL spec or a ModeGPT checkpoint) runs the same workload in our engine: ``b`` prompts
of ``--prompt-len`` random tokens, then ``--gen-len`` greedy decode steps with EOS ignored. Reported per
batch size: prefill tokens/s, decode output tokens/s and ms per step, and the decode roofline: the bytes
one decode step must read (every weight once, the LM head included, plus the KV cache of the batch at
the mean context) at ``--bandwidth`` bytes/s (the H200's measured ~4.3 TB/s). The first model is the
baseline: each row also carries ``speedup`` = its decode tokens/s over the baseline's at the same batch
(and the same kernel setting). ``--kernels both`` runs every model twice, with the PyTorch ops and with
the Triton kernels (``kernels/``), and adds ``kernel_speedup`` = Triton over PyTorch for the same model.
``--hf-generate`` also times transformers' ``generate()`` on the same model and workload.
Also reported: KV-cache bytes per token, and how many sequences of prompt+gen tokens fit in
``--kv-cache-gb`` (the compressed model's smaller q/k and v dims fit more).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from compressor.loading import load_modegpt
from server.engine import ops
from server.engine.dtypes import default_dtype
from server.engine.engine import LLMEngine
from server.engine.timing import prefill_then_decode
from server.engine.types import GenerationRequest, SamplingParams


def weight_bytes_per_step(state_dict: dict[str, torch.Tensor], config: dict, batch: int, dtype: torch.dtype) -> int:
    """Bytes of weights one decode step reads: all matrices once; of the embedding only ``batch`` rows,
    unless it is tied, when it is read whole as the LM head."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name, t in state_dict.items():
        lookup = name in ("model.embed_tokens.weight", "model.embed_tokens.weight_b")  # B of a factorized one
        if lookup and not config.get("tie_word_embeddings"):
            total += batch * t.shape[1] * size
        elif name == "model.embed_positions.weight":
            total += batch * t.shape[1] * size
        else:
            total += t.numel() * size
    return total


def _sync(device: str):
    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _requests(batch: int, prompt_len: int, gen_len: int, vocab: int, seed: int) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    return [GenerationRequest(f"{batch}-{i}", torch.randint(10, vocab, (prompt_len,), generator=gen).tolist(),
                              SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True))
            for i in range(batch)]


def bench_engine(engine: LLMEngine, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> dict:
    for req in _requests(batch, prompt_len, gen_len, engine.vocab_size, seed):
        engine.add_request(req)
    t = prefill_then_decode(engine)
    return {"prefill_tok_s": batch * prompt_len / t.prefill_s, "decode_tok_s": batch * t.decode_steps / t.decode_s,
            "ms_per_step": t.ms_per_decode_step, "decode_steps": t.decode_steps}


def bench_hf_generate(model, batch: int, prompt_len: int, gen_len: int, vocab: int, device: str) -> float:
    sync = _sync(device)
    ids = torch.randint(10, vocab, (batch, prompt_len), device=device)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                  do_sample=False, pad_token_id=0)
    model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4,
                                  "attention_mask": torch.ones_like(ids[:, :8])})  # warm-up
    sync()
    t = time.perf_counter()
    model.generate(ids, **kwargs)
    sync()
    return batch * gen_len / (time.perf_counter() - t)


def run_bench_engine(args) -> int:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    rows, info, baseline, by_torch = [], [], {}, {}
    settings = {"auto": [None], "on": [True], "off": [False], "both": [False, True]}[args.kernels]
    for spec in args.models:
        loaded = load_modegpt(spec, device, dtype)
        hf = loaded.hf_model().to(device) if args.hf_generate else None
        for use_kernels in settings:
            engine = LLMEngine(loaded.config, loaded.state_dict, device=device, dtype=dtype,
                               kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)), max_num_seqs=max(args.batch),
                               max_num_batched_tokens=max(8192, max(args.batch)),
                               max_model_len=args.prompt_len + args.gen_len + 16, cuda_graphs=not args.no_graphs,
                               eos_token_id=None, use_kernels=use_kernels)
            kernels = "triton" if engine.runner.kernels else "torch"
            kv = engine.runner.kv
            seq_len = args.prompt_len + args.gen_len
            info.append({"model": spec, "kernels": kernels, "kv_bytes_per_token": kv.bytes_per_token,
                         "sequences_in_budget": kv.max_sequences(seq_len), "kv_cache_gb": args.kv_cache_gb})
            for b in args.batch:
                bench_engine(engine, b, min(args.prompt_len, 16), 4, seed=1)  # warm-up (graphs, allocator)
                r = bench_engine(engine, b, args.prompt_len, args.gen_len)
                step_bytes = weight_bytes_per_step(loaded.state_dict, loaded.config, b, dtype) + \
                    b * (args.prompt_len + args.gen_len / 2) * kv.bytes_per_token
                roof = b / (step_bytes / args.bandwidth)
                row = {"model": spec, "kernels": kernels, "batch": b, **r, "bytes_per_step": step_bytes,
                       "roofline_tok_s": roof, "fraction_of_roofline": r["decode_tok_s"] / roof}
                if hf is not None and use_kernels is not True:
                    row["hf_generate_tok_s"] = bench_hf_generate(hf, b, args.prompt_len, args.gen_len,
                                                                 loaded.config["vocab_size"], device)
                baseline.setdefault((kernels, b), r["decode_tok_s"])
                row["speedup"] = r["decode_tok_s"] / baseline[(kernels, b)]
                if kernels == "torch":
                    by_torch[(spec, b)] = r["decode_tok_s"]
                elif (spec, b) in by_torch:
                    row["kernel_speedup"] = r["decode_tok_s"] / by_torch[(spec, b)]
                rows.append(row)
                print(f"{spec:40s} {kernels:6s} b={b:4d} decode {r['decode_tok_s']:9.0f} tok/s "
                      f"({r['ms_per_step']:.2f} ms/step, {row['fraction_of_roofline']:.0%} of roofline, "
                      f"x{row['speedup']:.2f}" + (f", kernels x{row['kernel_speedup']:.2f}" if "kernel_speedup" in row
                                                  else "") + ")"
                      + (f" | HF generate {row['hf_generate_tok_s']:.0f} tok/s" if "hf_generate_tok_s" in row else "")
                      + f" | prefill {r['prefill_tok_s']:.0f} tok/s", flush=True)
            del engine
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        del hf, loaded
        ops.reset_ops()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    hardware = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    payload = {"bench": "engine", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": hardware, "dtype": str(dtype), "prompt_len": args.prompt_len, "gen_len": args.gen_len,
               "bandwidth_Bps": args.bandwidth, "cuda_graphs": not args.no_graphs, "models": info, "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.json}")
    return 0


def add_engine_bench(bsub) -> None:
    p = bsub.add_parser("engine", help="offline decode/prefill throughput of one or more models in our engine")
    p.add_argument("models", nargs="+", help="MODEL specs or checkpoints; the first is the baseline")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kv-cache-gb", type=float, default=8.0)
    p.add_argument("--bandwidth", type=float, default=4.3e12, help="memory bandwidth for the roofline, bytes/s")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--kernels", choices=["auto", "on", "off", "both"], default="auto",
                   help="Triton kernels: auto (on CUDA), on, off, or both (each model twice, for kernel_speedup)")
    p.add_argument("--hf-generate", action="store_true", help="also time transformers' generate()")
    p.add_argument("--json", type=Path, default=Path("runs/bench-engine.json"))
    p.set_defaults(func=run_bench_engine)
