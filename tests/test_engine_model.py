"""The engine's ModeGPT model against independent implementations of docs/CHECKPOINT.md:
a float64 loop-over-heads reference written here, transformers' Llama / OPT for uncompressed configs,
and (when it exists) the lead's `compressor.modeling.ModeGPTForCausalLM`. Also: KV-cache incremental
decode and chunked prefill equal full recomputation."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.kv_cache import PagedKVCache, bytes_per_token
from server.engine.model import AttentionMetadata, ModeGPTModel
from server.engine.testing import assert_same_generations, llama_like_config, opt_like_config, random_state_dict
from server.engine.types import GenerationRequest, SamplingParams

torch.set_num_threads(1)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}


# ------------------------------------------------------------------------------ float64 reference


def ref_inv_freq(cfg: dict) -> list[float]:
    d = cfg["head_dim"]
    freqs = [1.0 / cfg["rope_theta"] ** (2 * i / d) for i in range(d // 2)]
    rs = cfg.get("rope_scaling_params")
    if not rs:
        return freqs
    assert rs["rope_type"] == "llama3"
    out = []
    low_wl = rs["original_max_position_embeddings"] / rs["low_freq_factor"]
    high_wl = rs["original_max_position_embeddings"] / rs["high_freq_factor"]
    for f in freqs:  # Meta's reference formulation
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / rs["factor"])
        else:
            s = (rs["original_max_position_embeddings"] / wl - rs["low_freq_factor"]) / (
                rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append((1 - s) * f / rs["factor"] + s * f)
    return out


def reference_logits(cfg: dict, sd: dict, ids: list[int], scale_by_qk_dim: bool = False) -> torch.Tensor:
    sd = {k: v.double() for k, v in sd.items()}
    T, H, Hkv = len(ids), cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps = cfg["norm_eps"]

    def lin(name, x):
        if f"{name}.weight" in sd:
            y = x @ sd[f"{name}.weight"].T
        else:
            y = (x @ sd[f"{name}.weight_a"].T) @ sd[f"{name}.weight_b"].T
        return y + sd[f"{name}.bias"] if f"{name}.bias" in sd else y

    def norm(name, x):
        w = sd[f"{name}.weight"]
        if cfg["norm_type"] == "rms":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w + sd[f"{name}.bias"]

    def act(x):
        return {"silu": lambda t: t / (1 + torch.exp(-t)), "relu": lambda t: t.clamp_min(0)}[cfg["hidden_act"]](x)

    x = sd["model.embed_tokens.weight"][ids]
    if cfg["position_type"] == "learned":
        x = x + sd["model.embed_positions.weight"][[t + cfg["position_offset"] for t in range(T)]]
    inv = ref_inv_freq(cfg) if cfg["position_type"] == "rope" else None
    d = cfg["head_dim"]
    for i, lc in enumerate(cfg["layers"]):
        p = f"model.layers.{i}"
        dk, dv = lc["qk_dim"], lc["v_dim"]
        h = norm(f"{p}.input_norm", x)
        q = lin(f"{p}.self_attn.q_proj", h).view(T, H, dk)
        k = lin(f"{p}.self_attn.k_proj", h).view(T, Hkv, dk)
        v = lin(f"{p}.self_attn.v_proj", h).view(T, Hkv, dv)
        out = torch.zeros(T, H, dv, dtype=torch.float64)
        for head in range(H):
            g = head // (H // Hkv)
            qh, kh = q[:, head].clone(), k[:, g].clone()
            if inv is not None:
                m = dk // 2
                for t in range(T):
                    for j in range(m):
                        f = inv[lc["qk_index"][g][j] % (d // 2)]
                        c, s = math.cos(t * f), math.sin(t * f)
                        for vec, src in ((qh, q[:, head]), (kh, k[:, g])):
                            a, b = src[t, j].item(), src[t, j + m].item()
                            vec[t, j], vec[t, j + m] = a * c - b * s, b * c + a * s
            scores = qh @ kh.T / math.sqrt(dk if scale_by_qk_dim else d)
            scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            out[:, head] = torch.softmax(scores, -1) @ v[:, g]
        x = x + lin(f"{p}.self_attn.o_proj", out.reshape(T, H * dv))
        h = norm(f"{p}.post_attention_norm", x)
        if cfg["mlp_type"] == "gated":
            m_ = act(lin(f"{p}.mlp.gate_proj", h)) * lin(f"{p}.mlp.up_proj", h)
        else:
            m_ = act(lin(f"{p}.mlp.up_proj", h))
        x = x + lin(f"{p}.mlp.down_proj", m_)
    x = norm("model.norm", x)
    head_w = sd["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else sd["lm_head.weight"]
    return x @ head_w.T


def full_logits(model: ModeGPTModel, ids: list[int]) -> torch.Tensor:
    t = torch.tensor(ids)
    return model(t, torch.arange(len(ids)), None, AttentionMetadata.no_cache([len(ids)]))


CONFIGS = {
    "llama": lambda: llama_like_config(),
    "llama3-rope": lambda: llama_like_config(rope_scaling=LLAMA3, seed=3),
    "opt": lambda: opt_like_config(),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_float64_reference(name):
    cfg = CONFIGS[name]()
    sd = random_state_dict(cfg, seed=7)
    ids = torch.randint(0, cfg["vocab_size"], (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = reference_logits(cfg, sd, ids)
    got64 = full_logits(ModeGPTModel(cfg, sd, dtype=torch.float64), ids).double()
    got32 = full_logits(ModeGPTModel(cfg, sd, dtype=torch.float32), ids).double()
    assert ref.abs().max() > 1.0  # logits are not degenerate
    # float64 engine: only the float32 RoPE angles (as transformers computes them) differ
    torch.testing.assert_close(got64, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got32, ref, atol=2e-4, rtol=1e-4)


def test_softmax_scale_uses_original_head_dim():
    """The engine must use head_dim**-0.5; a reference that scales by the kept qk_dim disagrees with it."""
    cfg = llama_like_config()
    sd = random_state_dict(cfg, seed=2)
    ids = list(range(20))
    got = full_logits(ModeGPTModel(cfg, sd), ids).double()
    wrong = reference_logits(cfg, sd, ids, scale_by_qk_dim=True)
    assert (got - wrong).abs().max() > 1e-2
    torch.testing.assert_close(got, reference_logits(cfg, sd, ids), atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ transformers


def _uncompressed(cfg: dict) -> dict:
    """The same architecture with nothing removed: qk_dim = v_dim = head_dim, identity qk_index."""
    d = cfg["head_dim"]
    cfg = dict(cfg, linear_ranks={})
    cfg["layers"] = [dict(lc, qk_dim=d, v_dim=d, qk_index=[list(range(d))] * cfg["num_key_value_heads"])
                     for lc in cfg["layers"]]
    return cfg


def test_uncompressed_llama_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _uncompressed(llama_like_config(rope_scaling=LLAMA3))
    sd = random_state_dict(cfg, seed=11)
    hf_cfg = LlamaConfig(vocab_size=cfg["vocab_size"], hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                         max_position_embeddings=256, rope_theta=10000.0, rope_scaling=dict(LLAMA3),
                         tie_word_embeddings=False, attn_implementation="eager")
    hf = LlamaForCausalLM(hf_cfg).eval()
    hsd = {}
    for k, v in sd.items():
        k = k.replace("input_norm", "input_layernorm").replace("post_attention_norm", "post_attention_layernorm")
        hsd[k] = v
    for i, lc in enumerate(cfg["layers"]):  # HF needs one MLP width: pad ours with zero rows/cols
        inter = lc["intermediate_size"]
        for n in ("gate_proj", "up_proj"):
            w = torch.zeros(96, 64)
            w[:inter] = hsd[f"model.layers.{i}.mlp.{n}.weight"]
            hsd[f"model.layers.{i}.mlp.{n}.weight"] = w
        w = torch.zeros(64, 96)
        w[:, :inter] = hsd[f"model.layers.{i}.mlp.down_proj.weight"]
        hsd[f"model.layers.{i}.mlp.down_proj.weight"] = w
    missing, unexpected = hf.load_state_dict(hsd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    ids = list(range(5, 60))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
    got = full_logits(ModeGPTModel(cfg, sd), ids).double()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_uncompressed_opt_matches_transformers():
    from transformers import OPTConfig, OPTForCausalLM

    cfg = _uncompressed(opt_like_config())
    for lc in cfg["layers"]:
        lc["intermediate_size"] = 80
    sd = random_state_dict(cfg, seed=12)
    hf_cfg = OPTConfig(vocab_size=cfg["vocab_size"], hidden_size=64, ffn_dim=80, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                       do_layer_norm_before=True, activation_function="relu", enable_bias=True,
                       tie_word_embeddings=True, dropout=0.0, attention_dropout=0.0, pad_token_id=1,
                       attn_implementation="eager")
    hf = OPTForCausalLM(hf_cfg).eval()
    ren = {"self_attn.o_proj": "self_attn.out_proj", "input_norm": "self_attn_layer_norm",
           "post_attention_norm": "final_layer_norm", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}
    hsd = {}
    for k, v in sd.items():
        for a, b in ren.items():
            k = k.replace(a, b)
        k = k.replace("model.layers.", "model.decoder.layers.").replace("model.embed_", "model.decoder.embed_")
        k = k.replace("model.norm.", "model.decoder.final_layer_norm.")
        hsd[k] = v
    missing, unexpected = hf.load_state_dict(hsd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    ids = list(range(3, 50))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
    got = full_logits(ModeGPTModel(cfg, sd), ids).double()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.skipif(importlib.util.find_spec("compressor.modeling") is None
                    if importlib.util.find_spec("compressor") is not None else True,
                    reason="compressor/modeling.py (ModeGPTForCausalLM) does not exist yet")
@pytest.mark.parametrize("name", ["llama", "opt"])
def test_matches_compressor_modeling(name):
    from compressor.modeling import ModeGPTForCausalLM

    cfg = CONFIGS[name]()
    sd = random_state_dict(cfg, seed=5)
    hf = ModeGPTForCausalLM.from_modegpt(cfg, sd).float().eval()
    ids = list(range(2, 40))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
    got = full_logits(ModeGPTModel(cfg, sd), ids).double()
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------ cache == recompute


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_chunked_prefill_and_decode_with_paged_cache_equal_full_forward(name):
    cfg = CONFIGS[name]()
    sd = random_state_dict(cfg, seed=3)
    model = ModeGPTModel(cfg, sd)
    kv = PagedKVCache(model.kv_shapes(), budget_bytes=64 * 4 * bytes_per_token(model.kv_shapes(), torch.float32),
                      block_size=4, dtype=torch.float32)
    assert kv.num_blocks == 64
    g = torch.Generator().manual_seed(0)
    seqs = {s: torch.randint(0, cfg["vocab_size"], (n,), generator=g).tolist() for s, n in (("a", 23), ("b", 9))}
    full = {s: full_logits(model, ids) for s, ids in seqs.items()}
    alloc = kv.allocator
    # "a": prefill in chunks 7 + 10, then decode its last 6 tokens one by one, interleaved with "b"'s prefill
    steps = [[("a", 0, 7)], [("a", 7, 10), ("b", 0, 5)], [("a", 17, 1), ("b", 5, 4)]] + \
            [[("a", p, 1)] for p in range(18, 23)]
    for step in steps:
        decodes = [c for c in step if c[2] == 1 and c[1] > 0]
        prefills = [c for c in step if c not in decodes]
        ids, pos, slots = [], [], []
        for s, start, n in decodes + prefills:
            alloc.grow(s, start + n)
            ids += seqs[s][start:start + n]
            pos += list(range(start, start + n))
            slots += [alloc.slot(s, p) for p in range(start, start + n)]
        width = max((len(alloc.table(s)) for s, _, _ in decodes), default=0)
        meta = AttentionMetadata(
            num_decode=len(decodes), slot_mapping=torch.tensor(slots), block_size=4,
            decode_block_tables=torch.tensor([alloc.table(s) + [0] * (width - len(alloc.table(s)))
                                              for s, _, _ in decodes]).reshape(len(decodes), width),
            decode_context_lens=torch.tensor([st + n for _, st, n in decodes]),
            prefill_query_lens=[n for _, _, n in prefills], prefill_context_lens=[st + n for _, st, n in prefills],
            prefill_block_tables=[torch.tensor(alloc.table(s)) for s, _, _ in prefills])
        out = model(torch.tensor(ids), torch.tensor(pos), kv.caches, meta)
        row = 0
        for s, start, n in decodes + prefills:
            torch.testing.assert_close(out[row:row + n], full[s][start:start + n], atol=1e-4, rtol=1e-4)
            row += n
    assert kv.usage() == pytest.approx((6 + 3) / 63)
    assert alloc.free("a") == 6 and kv.usage() == pytest.approx(3 / 63)


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_engine_greedy_decode_logprobs_equal_full_recompute(name):
    """Generated tokens' logprobs (KV-cache decode, chunked prefill, prompt logprobs) equal a cache-free
    teacher-forced forward over prompt + output."""
    cfg = CONFIGS[name]()
    sd = random_state_dict(cfg, seed=4)
    eng = LLMEngine(cfg, sd, kv_cache_bytes=1 << 20, max_num_seqs=4, max_num_batched_tokens=8, block_size=4)
    prompt = list(range(10, 31))  # 21 tokens: 3 chunks of <= 8
    req = GenerationRequest("x", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        logprobs=3, prompt_logprobs=2))
    evs = eng.run_to_completion([req])["x"]
    toks = [e.token_id for e in evs]
    assert len(toks) == 12 and evs[-1].finish_reason == "length"
    lp = eng.score([prompt + toks])[0]
    for i, e in enumerate(evs):
        pos = len(prompt) - 1 + i
        assert e.token_id == int(lp[pos].argmax())
        assert e.logprob.logprob == pytest.approx(float(lp[pos, e.token_id]), abs=1e-4)
        top = lp[pos].topk(3)
        assert list(e.logprob.top) == top.indices.tolist()
    plp = evs[0].prompt_logprobs
    assert plp[0] is None and len(plp) == len(prompt)
    for j in range(1, len(prompt)):
        assert plp[j].token_id == prompt[j]
        assert plp[j].logprob == pytest.approx(float(lp[j - 1, prompt[j]]), abs=1e-4)
        assert len(plp[j].top) in (2, 3) and prompt[j] in plp[j].top
    assert eng.stats().kv_cache_usage == 0.0


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="kernels package not present")
def test_kernels_bridge_gives_same_generation():
    """`use_kernels=True` routes factorized linears and decode attention through kernels.dispatch (on CPU
    its PyTorch reference path); generations and logprobs must not change."""
    from server.engine import ops

    cfg = CONFIGS["llama"]()
    sd = random_state_dict(cfg, seed=9)
    r = [GenerationRequest(f"k{i}", list(range(3 + i, 12 + 2 * i)),
                           SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=1)) for i in range(4)]
    ref = LLMEngine(cfg, sd, kv_cache_bytes=1 << 20, block_size=4).run_to_completion(r)
    try:
        eng = LLMEngine(cfg, sd, kv_cache_bytes=1 << 20, block_size=4, use_kernels=True)
        assert eng.runner.kernels and ops.OPS["factorized_linear"] is not ops.factorized_linear
        got = eng.run_to_completion(r)
    finally:
        ops.reset_ops()
    assert ops.OPS["decode_attention"] is ops.decode_attention
    assert_same_generations(ref, got, logprob_tol=1e-4)


def test_default_dtype_follows_the_cpu(tmp_path):
    """bf16 on CPUs that advertise native bf16 (AVX512-BF16 / AMX-BF16), float32 on others and when
    /proc/cpuinfo is unreadable; CUDA always bf16."""
    from server.engine import dtypes

    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n")
    without = tmp_path / "plain"
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
    assert dtypes.cpu_has_native_bf16(str(with_bf16))
    assert not dtypes.cpu_has_native_bf16(str(without))
    assert not dtypes.cpu_has_native_bf16(str(tmp_path / "missing"))
    expected = torch.bfloat16 if dtypes.cpu_has_native_bf16() else torch.float32
    assert dtypes.default_dtype("cpu") == expected
    assert dtypes.default_dtype("cuda") == torch.bfloat16


def test_compiled_decode_gives_same_generation():
    """`compile=True` (torch.compile of the decode forward) runs and changes neither tokens nor
    logprobs. It used to fail in dynamo on the inference-mode-wrapped forward. Speed is not asserted:
    on CPU every decode step changes the attention metadata and recompiles (docs/BENCHMARKS.md)."""
    cfg = CONFIGS["llama"]()
    sd = random_state_dict(cfg, seed=9)
    r = [GenerationRequest(f"c{i}", list(range(3 + i, 12 + 2 * i)),
                           SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=1)) for i in range(2)]
    ref = LLMEngine(cfg, sd, kv_cache_bytes=1 << 20, block_size=4).run_to_completion(r)
    got = LLMEngine(cfg, sd, kv_cache_bytes=1 << 20, block_size=4, compile=True).run_to_completion(r)
    assert_same_generations(ref, got, logprob_tol=1e-4)


def test_graph_context_classes(monkeypatch):
    """The decode graphs' block-table widths: one per context class below the graph limit, the limit
    itself always; the env override and its errors."""
    from server.engine.runner import GRAPH_CONTEXT_LENS, graph_widths, resolve_graph_context_lens

    monkeypatch.delenv("MODEGPT_GRAPH_CONTEXTS", raising=False)
    assert resolve_graph_context_lens() == GRAPH_CONTEXT_LENS == (256, 1024)
    assert graph_widths(GRAPH_CONTEXT_LENS, 16, 256) == [16, 64, 256]
    assert graph_widths(GRAPH_CONTEXT_LENS, 16, 8) == [8]  # a short max_model_len: one class
    assert graph_widths((), 16, 256) == [256]
    assert resolve_graph_context_lens((100,)) == (100,)
    monkeypatch.setenv("MODEGPT_GRAPH_CONTEXTS", "0")
    assert resolve_graph_context_lens() == ()
    monkeypatch.setenv("MODEGPT_GRAPH_CONTEXTS", "128, 512")
    assert resolve_graph_context_lens() == (128, 512)
    assert graph_widths(resolve_graph_context_lens(), 16, 256) == [8, 32, 256]
    for bad in ("x", "-5"):
        monkeypatch.setenv("MODEGPT_GRAPH_CONTEXTS", bad)
        with pytest.raises(ValueError):
            resolve_graph_context_lens()


def test_decode_fast_path_prepares_what_the_general_path_prepares():
    """`ModelRunner._prepare_decode` (decode-only steps) builds exactly the inputs of the general
    `_prepare_general`, step after step while contexts cross block boundaries; a step with a prefill or a
    non-sampling chunk takes the general path."""
    from server.engine.engine import LLMEngine
    from server.engine.testing import llama_like_config, random_state_dict
    from server.engine.types import GenerationRequest, SamplingParams

    cfg = llama_like_config()
    eng = LLMEngine(cfg, random_state_dict(cfg, seed=3), kv_cache_bytes=1 << 22, block_size=4, max_num_seqs=8)
    for i in range(5):
        eng.add_request(GenerationRequest(f"f{i}", list(range(5, 8 + 3 * i)),
                                          SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)))
    runner, decode_steps = eng.runner, 0
    while eng.has_work():
        out = eng.scheduler.schedule()
        if not out.prefills:
            fast, general = runner._prepare_decode(out), runner._prepare_general(out)
            assert fast[:5] == general[:5] and fast[6] == general[6]
            for a, b in ((fast[5], general[5]), (fast[7], general[7])):
                assert {k: v for k, v in vars(a).items() if k != "logits"} == \
                       {k: v for k, v in vars(b).items() if k != "logits"}
            decode_steps += 1
        else:
            assert runner.prepare(out)[7].prompt_rows == runner._prepare_general(out)[7].prompt_rows
        eng.step()  # schedules again: in a decode-only state that is the same batch
    assert decode_steps >= 8
