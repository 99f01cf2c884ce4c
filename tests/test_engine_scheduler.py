"""Continuous batching: batched == alone, chunked prefill does not stall decodes, abort, preemption,
admission by free cache, stops, prompt-only requests (max_tokens=0)."""
from __future__ import annotations

import random

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.kv_cache import bytes_per_token
from server.engine.testing import llama_like_config, opt_like_config, random_state_dict
from server.engine.types import GenerationRequest, SamplingParams

torch.set_num_threads(1)

CFGS = {"llama": llama_like_config, "opt": opt_like_config}


def make_engine(name="llama", blocks=512, block_size=4, **kw):
    cfg = CFGS[name]()
    sd = random_state_dict(cfg, seed=21)
    shapes = [(cfg["num_key_value_heads"], lc["qk_dim"], lc["v_dim"]) for lc in cfg["layers"]]
    budget = blocks * block_size * bytes_per_token(shapes, torch.float32)
    kw.setdefault("max_num_seqs", 32)
    kw.setdefault("max_num_batched_tokens", 64)
    return LLMEngine(cfg, sd, kv_cache_bytes=budget, block_size=block_size, **kw)


def greedy(rid, prompt, n, **kw):
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                         logprobs=kw.pop("logprobs", 2), **kw))


def prompts(n, vocab, seed=0, lo=3, hi=40):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def alone(eng, reqs):
    return {r.request_id: eng.run_to_completion([r])[r.request_id] for r in reqs}


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_32_concurrent_greedy_equal_one_at_a_time(name):
    eng = make_engine(name)
    ps = prompts(32, eng.vocab_size, seed=1)
    reqs = [greedy(f"r{i}", p, 8 + i % 9) for i, p in enumerate(ps)]
    ref = alone(eng, reqs)
    assert eng.stats().kv_cache_usage == 0.0
    steps_before = eng.stats().num_steps_total
    got = eng.run_to_completion(reqs)
    batched_steps = eng.stats().num_steps_total - steps_before
    assert batched_steps < sum(len(v) for v in ref.values()) / 4  # really batched
    for r in reqs:
        a, b = ref[r.request_id], got[r.request_id]
        assert [e.token_id for e in a] == [e.token_id for e in b]
        assert len(b) == r.params.max_tokens and b[-1].finished and b[-1].finish_reason == "length"
        for x, y in zip(a, b):
            assert x.logprob.logprob == pytest.approx(y.logprob.logprob, abs=1e-4)
            assert list(x.logprob.top) == list(y.logprob.top)
            for t in x.logprob.top:
                assert x.logprob.top[t] == pytest.approx(y.logprob.top[t], abs=1e-4)
    st = eng.stats()
    assert st.num_running == st.num_waiting == 0 and st.kv_cache_usage == 0.0
    assert st.generation_tokens_total == 2 * sum(r.params.max_tokens for r in reqs)
    assert st.prompt_tokens_total == 2 * sum(len(p) for p in ps)


def test_long_prompt_does_not_stall_running_decodes():
    eng = make_engine(max_num_batched_tokens=16, max_num_seqs=8)
    ps = prompts(4, eng.vocab_size, seed=2, lo=4, hi=8)
    short = [greedy(f"s{i}", p, 60) for i, p in enumerate(ps)]
    for r in short:
        eng.add_request(r)
    produced = {r.request_id: 0 for r in short}
    while any(v == 0 for v in produced.values()):
        for ev in eng.step():
            produced[ev.request_id] += 1
    long_prompt = list(range(200))
    eng.add_request(greedy("long", long_prompt, 3))
    prefill_steps = 0
    while True:
        evs = eng.step()
        got = {e.request_id for e in evs}
        assert {r.request_id for r in short} <= got, "a running decode did not advance this step"
        prefill_steps += 1
        if "long" in got:
            break
    # 200 prompt tokens through a budget of 16 - 4 decodes = 12 per step
    assert prefill_steps == -(-200 // 12)
    assert eng.scheduler.num_preemptions == 0


def test_abort_frees_cache_blocks_at_once():
    eng = make_engine()
    alloc = eng.runner.kv.allocator
    ps = prompts(3, eng.vocab_size, seed=3, lo=20, hi=30)
    for i, p in enumerate(ps):
        eng.add_request(greedy(f"a{i}", p, 50))
    for _ in range(4):
        eng.step()
    free_before = alloc.num_free_blocks
    held = len(alloc.table("a1"))
    assert held >= 5 and eng.stats().kv_cache_usage > 0
    ev = eng.abort("a1")
    assert ev.finished and ev.finish_reason == "abort" and ev.token_id is None
    assert alloc.num_free_blocks == free_before + held and alloc.table("a1") == []
    assert eng.abort("a1") is None and eng.abort("nope") is None
    eng.add_request(greedy("w", ps[0], 5))  # waiting (not yet scheduled) requests abort too
    assert eng.abort("w").finish_reason == "abort"
    rest = {}
    while eng.has_work():
        for e in eng.step():
            rest.setdefault(e.request_id, []).append(e)
    assert set(rest) == {"a0", "a2"} and "a1" not in rest
    assert alloc.num_free_blocks == alloc.num_usable_blocks


def test_preemption_under_a_tiny_cache_keeps_outputs_identical():
    """With too few blocks for all sequences, decodes preempt the newest (recompute) and outputs do not
    change; usage never exceeds 1 and all blocks come back."""
    eng = make_engine(blocks=24, max_num_seqs=8, max_num_batched_tokens=32)
    ps = prompts(8, eng.vocab_size, seed=4, lo=8, hi=14)
    reqs = [greedy(f"p{i}", p, 24) for i, p in enumerate(ps)]
    ref = alone(eng, reqs)
    got = eng.run_to_completion(reqs)
    assert eng.stats().num_preemptions_total > 0
    for r in reqs:
        assert [e.token_id for e in got[r.request_id]] == [e.token_id for e in ref[r.request_id]]
    assert eng.runner.kv.usage() == 0.0


def test_admission_is_limited_by_free_cache():
    eng = make_engine(blocks=17, block_size=4)  # 16 usable blocks = 64 tokens
    assert eng.runner.kv.capacity_tokens == 64 and eng.runner.kv.max_sequences(30) == 2
    for i in range(3):
        eng.add_request(greedy(f"c{i}", list(range(5, 35)), 2))  # 31 tokens incl. the first output: 8 blocks
    res = {}
    for e in eng.step():
        res.setdefault(e.request_id, []).append(e)
    st = eng.stats()
    assert st.num_running == 2 and st.num_waiting == 1 and st.kv_cache_usage == 1.0
    assert set(res) == {"c0", "c1"}
    while eng.has_work():
        for e in eng.step():
            res.setdefault(e.request_id, []).append(e)
    assert all(len(v) == 2 for v in res.values()) and len(res) == 3
    with pytest.raises(ValueError):
        eng.add_request(greedy("too-big", list(range(70)), 1))  # can never fit the cache


def test_stop_tokens_eos_ignore_eos_and_min_tokens():
    eng = make_engine(eos_token_id=None)
    p = prompts(1, eng.vocab_size, seed=5, lo=10, hi=10)[0]
    base = [e.token_id for e in eng.run_to_completion([greedy("b", p, 12)])["b"]]
    stop = base[4]
    first = base.index(stop)
    ev = eng.run_to_completion([greedy("s", p, 12, stop_token_ids=[stop])])["s"]
    assert [e.token_id for e in ev] == base[:first + 1]
    assert ev[-1].finish_reason == "stop" and ev[-1].stop_token_id == stop
    # min_tokens suppresses the stop token until min_tokens tokens exist
    ev = eng.run_to_completion([greedy("m", p, 12, stop_token_ids=[stop], min_tokens=first + 2)])["m"]
    assert all(e.token_id != stop for e in ev[:first + 2])
    # EOS (engine-level), stop_reason None; ignore_eos keeps going
    eng.eos_token_ids[:] = [stop]
    eng.sampler.eos_token_ids[:] = [stop]
    r = GenerationRequest("e", p, SamplingParams(max_tokens=12, temperature=0.0))
    ev = eng.run_to_completion([r])["e"]
    assert [e.token_id for e in ev] == base[:first + 1]
    assert ev[-1].finish_reason == "stop" and ev[-1].stop_token_id is None
    ev = eng.run_to_completion([greedy("i", p, 12)])["i"]
    assert [e.token_id for e in ev] == base and ev[-1].finish_reason == "length"


@pytest.mark.parametrize("plen", [60, 49])  # two chunks; 48 + a last single token (scheduled as a decode)
def test_prompt_logprobs_only_with_max_tokens_zero(plen):
    eng = make_engine("opt", max_num_batched_tokens=48)
    p = prompts(1, eng.vocab_size, seed=6, lo=plen, hi=plen)[0]
    r = GenerationRequest("z", p, SamplingParams(max_tokens=0, prompt_logprobs=3))
    ev = eng.run_to_completion([r])["z"]
    assert len(ev) == 1 and ev[0].token_id is None and ev[0].finished and ev[0].finish_reason == "length"
    plp = ev[0].prompt_logprobs
    ref = eng.score([p])[0]
    assert plp[0] is None and len(plp) == len(p)
    for j in range(1, len(p)):
        assert plp[j].token_id == p[j]
        assert plp[j].logprob == pytest.approx(float(ref[j - 1, p[j]]), abs=1e-4)
        top = ref[j - 1].topk(3).indices.tolist()
        assert list(plp[j].top)[:3] == top
    assert eng.stats().generation_tokens_total == 0 and eng.runner.kv.usage() == 0.0
    ev = eng.run_to_completion([GenerationRequest("n", p, SamplingParams(max_tokens=0))])["n"]
    assert len(ev) == 1 and ev[0].finished and ev[0].prompt_logprobs is None and ev[0].token_id is None


def test_max_model_len_and_validation():
    eng = make_engine(max_model_len=20)
    ev = eng.run_to_completion([greedy("l", list(range(15)), 100)])["l"]
    assert len(ev) == 5 and ev[-1].finish_reason == "length"  # 15 + 5 = max_model_len
    with pytest.raises(ValueError):
        eng.add_request(greedy("x", list(range(21)), 1))
    with pytest.raises(ValueError):
        eng.add_request(greedy("x", [eng.vocab_size], 1))
    with pytest.raises(ValueError):
        eng.add_request(greedy("x", [], 1))
    eng.add_request(greedy("d", [1, 2], 1))
    with pytest.raises(ValueError):
        eng.add_request(greedy("d", [1, 2], 1))
