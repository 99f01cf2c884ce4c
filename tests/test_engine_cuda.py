"""CUDA-only checks (skipped without a GPU): decode through CUDA graphs equals eager decode (padding to
buckets included), bf16 serving, MODEGPT_CUDA_GRAPHS=0, two AsyncEngines sharing one GPU."""
from __future__ import annotations

import asyncio

import pytest
import torch

from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.testing import assert_same_generations, llama_like_config, opt_like_config, random_state_dict
from server.engine.types import GenerationRequest, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def reqs(n, vocab, max_tokens=24, prompt_seed=0, **kw):
    g = torch.Generator().manual_seed(prompt_seed)
    out = []
    for i in range(n):
        p = torch.randint(0, vocab, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
        out.append(GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=2,
                                                                **kw)))
    return out


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_cuda_graph_decode_equals_eager(name):
    cfg = llama_like_config() if name == "llama" else opt_like_config()
    sd = random_state_dict(cfg, seed=41)
    kw = dict(device="cuda", dtype=torch.float32, kv_cache_bytes=1 << 24, block_size=16, max_num_seqs=64,
              max_num_batched_tokens=256, max_model_len=128)
    eager = LLMEngine(cfg, sd, cuda_graphs=False, **kw)
    graph = LLMEngine(cfg, sd, cuda_graphs=True, cuda_graph_max_len=64, **kw)
    assert not eager.runner.use_graphs and graph.runner.graphs
    rs = reqs(20, cfg["vocab_size"], max_tokens=70, temperature=0.0)  # contexts grow past 64: eager fallback too
    a = eager.run_to_completion(rs)
    b = graph.run_to_completion(reqs(20, cfg["vocab_size"], max_tokens=70, temperature=0.0))
    assert graph.runner.num_graph_steps > 20 and graph.runner.num_eager_steps > 0
    for r in rs:
        ta = [e.token_id for e in a[r.request_id]]
        tb = [e.token_id for e in b[r.request_id]]
        assert ta == tb
        for x, y in zip(a[r.request_id], b[r.request_id]):
            assert x.logprob.logprob == pytest.approx(y.logprob.logprob, abs=1e-3)
    # seeded sampling through graphs equals eager
    sa = eager.run_to_completion(reqs(9, cfg["vocab_size"], temperature=1.0, top_p=0.9, seed=5))
    sb = graph.run_to_completion(reqs(9, cfg["vocab_size"], temperature=1.0, top_p=0.9, seed=5))
    assert {k: [e.token_id for e in v] for k, v in sa.items()} == {k: [e.token_id for e in v] for k, v in sb.items()}


def test_cuda_graph_context_classes_equal_eager(monkeypatch):
    """Decode graphs captured per context class (block tables 2 and 6 blocks wide here, and eager past
    96 tokens) decode exactly what the eager engine decodes, and steps replay more than one class."""
    monkeypatch.setenv("MODEGPT_GRAPH_CONTEXTS", "32")
    cfg = llama_like_config()
    sd = random_state_dict(cfg, seed=43)
    kw = dict(device="cuda", dtype=torch.float32, kv_cache_bytes=1 << 24, block_size=16, max_num_seqs=16,
              max_num_batched_tokens=256, max_model_len=160)
    eager = LLMEngine(cfg, sd, cuda_graphs=False, **kw)
    graph = LLMEngine(cfg, sd, cuda_graphs=True, cuda_graph_max_len=96, **kw)
    assert graph.runner.graph_widths == [2, 6] and all(sorted(v) == [2, 6] for v in graph.runner.graphs.values())
    replayed = []
    run = graph.runner._run_graph

    def spy(ids, pos, slots, tables, ctx, *rest):
        replayed.append(graph.runner.graph_for(len(ids), max(len(t) for t in tables))[1])
        return run(ids, pos, slots, tables, ctx, *rest)

    monkeypatch.setattr(graph.runner, "_run_graph", spy)

    def short_prompts():  # 4-9 prompt tokens, 100 new ones: contexts pass through both classes, then eager
        return [GenerationRequest(f"c{i}", [7 + 13 * i + j for j in range(4 + i)],
                                  SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True, logprobs=1))
                for i in range(6)]

    a = eager.run_to_completion(short_prompts())
    b = graph.run_to_completion(short_prompts())
    assert set(replayed) == {2, 6} and graph.runner.num_eager_steps > 0
    assert_same_generations(a, b, logprob_tol=1e-3)


def test_async_scheduling_through_graphs_equals_synchronous():
    """Decode steps launched ahead with their input tokens copied on the device into the graph's input
    buffer give the synchronous engine's tokens: greedy, seeded sampling, penalties, EOS stops."""
    cfg = llama_like_config()
    sd = random_state_dict(cfg, seed=47)
    kw = dict(device="cuda", dtype=torch.float32, kv_cache_bytes=1 << 24, block_size=16, max_num_seqs=32,
              max_num_batched_tokens=256, max_model_len=128, eos_token_id=5)
    sync = LLMEngine(cfg, sd, async_scheduling=False, **kw)
    ahead = LLMEngine(cfg, sd, async_scheduling=True, **kw)
    assert ahead.runner.graphs and LLMEngine(cfg, sd, **kw).async_scheduling  # the CUDA default

    def mixed():
        rs = reqs(12, cfg["vocab_size"], max_tokens=40, temperature=0.0)
        rs += reqs(6, cfg["vocab_size"], max_tokens=30, prompt_seed=1, temperature=0.8, top_k=50, seed=9)
        rs += reqs(6, cfg["vocab_size"], max_tokens=30, prompt_seed=2, temperature=0.0, frequency_penalty=0.7,
                   presence_penalty=0.3)
        for i, r in enumerate(rs):
            r.request_id = f"m{i}"
            r.params.ignore_eos = i % 2 == 0
        return rs

    a = sync.run_to_completion(mixed())
    b = ahead.run_to_completion(mixed())
    assert ahead.num_steps_ahead > 20 and ahead.runner.num_graph_steps > 20
    assert_same_generations(a, b, logprob_tol=1e-4)
    assert [v[-1].finish_reason for v in a.values()] == [v[-1].finish_reason for v in b.values()]
    assert ahead.stats().kv_cache_usage == 0.0


def test_bf16_and_env_switch(monkeypatch):
    cfg = llama_like_config()
    sd = random_state_dict(cfg, seed=42)
    monkeypatch.setenv("MODEGPT_CUDA_GRAPHS", "0")
    off = LLMEngine(cfg, sd, device="cuda", dtype=torch.bfloat16, kv_cache_bytes=1 << 22, max_num_seqs=8)
    assert not off.runner.use_graphs
    monkeypatch.setenv("MODEGPT_CUDA_GRAPHS", "1")
    on = LLMEngine(cfg, sd, device="cuda", dtype=torch.bfloat16, kv_cache_bytes=1 << 22, max_num_seqs=8)
    assert on.runner.use_graphs and sorted(on.runner.graphs) == [1, 2, 4, 8]
    r = reqs(8, cfg["vocab_size"], temperature=0.0)
    a, b = off.run_to_completion(r), on.run_to_completion(reqs(8, cfg["vocab_size"], temperature=0.0))
    same = sum(x.token_id == y.token_id for k in a for x, y in zip(a[k], b[k]))
    assert same >= 0.9 * sum(len(v) for v in a.values())
    ref = LLMEngine(cfg, sd, kv_cache_bytes=1 << 22).score([r[0].prompt_token_ids])[0]
    got = on.score([r[0].prompt_token_ids])[0]
    err = (got - ref).abs()  # bf16 weights/activations vs the float32 CPU model
    assert err.mean() < 0.05 and err.max() < 0.5


def test_two_async_engines_share_one_gpu():
    engines = []
    for name, cfg in (("a", llama_like_config()), ("b", opt_like_config())):
        engines.append(AsyncEngine(name, cfg, random_state_dict(cfg, seed=3), None, device="cuda",
                                   dtype=torch.bfloat16, kv_cache_bytes=1 << 22, max_model_len=128, max_num_seqs=16))

    async def main():
        async def one(e, r):
            return [ev async for ev in e.generate(r)]
        jobs = [one(e, r) for e in engines for r in reqs(12, 300, temperature=0.8, seed=1)]
        return await asyncio.gather(*jobs)

    try:
        res = asyncio.run(main())
    finally:
        for e in engines:
            e.shutdown()
    assert len(res) == 24 and all(len(v) == 24 and v[-1].finish_reason == "length" for v in res)
    assert all(e.engine.runner.num_graph_steps > 0 for e in engines)


def test_triton_kernels_bridge_matches_reference_ops():
    from server.engine import ops

    cfg = llama_like_config()  # has factorized linears
    sd = random_state_dict(cfg, seed=43)
    kw = dict(device="cuda", dtype=torch.float32, kv_cache_bytes=1 << 22, max_num_seqs=16, max_model_len=128)
    ref = LLMEngine(cfg, sd, use_kernels=False, **kw).run_to_completion(reqs(10, cfg["vocab_size"], temperature=0.0))
    try:
        eng = LLMEngine(cfg, sd, use_kernels=True, **kw)
        if not eng.runner.kernels:
            pytest.skip("kernels package not importable")
        assert ops.OPS["decode_attention"] is not ops.decode_attention
        got = eng.run_to_completion(reqs(10, cfg["vocab_size"], temperature=0.0))
    finally:
        ops.reset_ops()
    assert_same_generations(ref, got, logprob_tol=1e-3)
