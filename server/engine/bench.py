"""A quick engine throughput check on random weights of a given shape (no checkpoint needed).

    python -m server.engine.bench --device cuda --batch 1 32 128 [--no-graphs] [--ratio 0.3]

Shapes default to SmolLM2-135M (30 layers, hidden 576, 9/3 heads, head_dim 64, vocab 49152); `--ratio`
shrinks per-layer qk_dim / v_dim / MLP width the way a compressed checkpoint would. Reports decode
tokens/s for each batch size (all sequences decoding together) and one prefill's tokens/s.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from server.engine.engine import LLMEngine
from server.engine.testing import random_state_dict
from server.engine.timing import prefill_then_decode
from server.engine.types import GenerationRequest, SamplingParams


def smol_config(ratio: float = 0.0, layers: int = 30) -> dict:
    rng = random.Random(0)
    d, hkv = 64, 3
    keep = 1.0 - ratio
    cfg_layers = []
    for _ in range(layers):
        m = max(1, int(round(d // 2 * keep)))
        qk_index = []
        for _ in range(hkv):
            pairs = sorted(rng.sample(range(d // 2), m))
            qk_index.append(pairs + [p + d // 2 for p in pairs])
        cfg_layers.append({"intermediate_size": max(8, int(1536 * keep)), "qk_dim": 2 * m,
                           "v_dim": max(1, int(d * keep)), "qk_index": qk_index})
    return {"vocab_size": 49152, "hidden_size": 576, "num_hidden_layers": layers, "num_attention_heads": 9,
            "num_key_value_heads": hkv, "head_dim": d, "max_position_embeddings": 8192, "norm_type": "rms",
            "norm_eps": 1e-5, "mlp_type": "gated", "hidden_act": "silu", "position_type": "rope",
            "rope_theta": 100000.0, "qkv_bias": False, "o_bias": False, "mlp_bias": False,
            "tie_word_embeddings": True, "layers": cfg_layers, "linear_ranks": {}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--ratio", type=float, default=0.0)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--no-graphs", action="store_true")
    ap.add_argument("--compile", action="store_true")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    cfg = smol_config(a.ratio, a.layers)
    sd = random_state_dict(cfg)
    t0 = time.time()
    eng = LLMEngine(cfg, sd, device=a.device, dtype=dtype, kv_cache_bytes=4 << 30, max_num_seqs=max(a.batch),
                    max_num_batched_tokens=max(8192, max(a.batch)), max_model_len=a.prompt_len + a.gen_len + 16,
                    cuda_graphs=not a.no_graphs, compile=a.compile, eos_token_id=None)
    print(f"init {time.time() - t0:.1f}s graphs={sorted(eng.runner.graphs)} kv_blocks={eng.runner.kv.num_blocks}")
    for b in a.batch:
        reqs = [GenerationRequest(f"{b}-{i}", [(i * 7 + j) % 49152 for j in range(a.prompt_len)],
                                  SamplingParams(max_tokens=a.gen_len, temperature=0.0, ignore_eos=True))
                for i in range(b)]
        for r in reqs:
            eng.add_request(r)
        t = prefill_then_decode(eng)
        print(f"batch {b:4d}: prefill {b * a.prompt_len / t.prefill_s:9.0f} tok/s ({t.prefill_steps} steps) | decode "
              f"{b * t.decode_steps / t.decode_s:9.0f} tok/s, {t.ms_per_decode_step:6.2f} ms/step")


if __name__ == "__main__":
    main()
