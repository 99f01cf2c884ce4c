"""Async scheduling (`LLMEngine(async_scheduling=True)`): a decode step is launched before the host has
read the previous step's tokens (they stay on the device as the next step's inputs). The tokens,
logprobs, finish reasons and cache accounting must equal the synchronous engine's, whatever ends a
sequence while a step is in flight: EOS, a stop id, max_tokens, max_model_len, an abort. Forced on
here on the CPU, where the same code runs with nothing overlapping."""
from __future__ import annotations

import random

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.kv_cache import bytes_per_token
from server.engine.sampler import Sampler
from server.engine.scheduler import Scheduler, Sequence
from server.engine.kv_cache import BlockAllocator
from server.engine.testing import llama_like_config, random_state_dict
from server.engine.types import GenerationRequest, SamplingParams

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model():
    cfg = llama_like_config()
    return cfg, random_state_dict(cfg, seed=41)


def engine(model, async_scheduling, blocks=512, block_size=4, **kw):
    cfg, sd = model
    shapes = [(cfg["num_key_value_heads"], lc["qk_dim"], lc["v_dim"]) for lc in cfg["layers"]]
    kw.setdefault("max_num_seqs", 32)
    kw.setdefault("max_num_batched_tokens", 64)
    return LLMEngine(cfg, sd, kv_cache_bytes=blocks * block_size * bytes_per_token(shapes, torch.float32),
                     block_size=block_size, async_scheduling=async_scheduling, **kw)


def mixed_requests(vocab, eos, n=24, seed=3):
    """Greedy and seeded random rows, logprobs, stop ids, EOS, min_tokens, penalties (which must count
    the pending token), and lengths that end on different steps."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 30))]
        kw = dict(max_tokens=4 + i % 11, temperature=0.0, ignore_eos=i % 3 != 0, logprobs=(i % 4) or None)
        if i % 5 == 1:
            kw.update(temperature=0.9, top_p=0.9, top_k=20, seed=100 + i)
        if i % 6 == 2:
            kw.update(stop_token_ids=[rng.randrange(vocab) for _ in range(40)])
        if i % 7 == 3:
            kw.update(min_tokens=3)
        if i % 8 == 5:
            kw.update(frequency_penalty=0.5, presence_penalty=0.2)
        if i % 9 == 4:
            kw.update(repetition_penalty=1.3)
        reqs.append(GenerationRequest(f"r{i}", prompt, SamplingParams(**kw)))
    return reqs


def drive(eng, reqs, arrive_every=4):
    """Requests arrive one every `arrive_every` steps (joins at step boundaries, some while a step is
    in flight); all events per request."""
    out = {r.request_id: [] for r in reqs}
    pending = list(reqs)
    step = 0
    while pending or eng.has_work():
        if pending and step % arrive_every == 0:
            eng.add_request(pending.pop(0))
        for ev in eng.step():
            out[ev.request_id].append(ev)
        step += 1
    return out


def assert_same(ref, got):
    assert ref.keys() == got.keys()
    for k in ref:
        a, b = ref[k], got[k]
        assert [e.token_id for e in a] == [e.token_id for e in b], k
        assert [(e.finished, e.finish_reason, e.stop_token_id) for e in a] == \
               [(e.finished, e.finish_reason, e.stop_token_id) for e in b], k
        for x, y in zip(a, b):
            assert (x.logprob is None) == (y.logprob is None)
            if x.logprob is not None:
                assert x.logprob.logprob == pytest.approx(y.logprob.logprob, abs=1e-4)
                assert list(x.logprob.top) == list(y.logprob.top)


def test_async_scheduling_gives_the_synchronous_engine_s_results(model):
    vocab = model[0]["vocab_size"]
    sync = engine(model, False, eos_token_id=7)
    ref = drive(sync, mixed_requests(vocab, 7))
    eng = engine(model, True, eos_token_id=7)
    got = drive(eng, mixed_requests(vocab, 7))
    assert_same(ref, got)
    assert sync.num_steps_ahead == 0 and eng.num_steps_ahead > 10
    reasons = {e[-1].finish_reason for e in got.values()}
    assert {"length", "stop"} <= reasons
    a, b = sync.stats(), eng.stats()
    assert b.generation_tokens_total == a.generation_tokens_total
    assert b.prompt_tokens_total == a.prompt_tokens_total
    assert b.requests_finished_total == a.requests_finished_total == 24
    assert b.num_running == b.num_waiting == 0 and b.kv_cache_usage == 0.0
    assert not eng.has_work()


@pytest.mark.parametrize("setting", ["freq-presence", "repetition", "min-tokens"])
def test_a_step_launched_ahead_counts_the_pending_token(model, setting):
    """Penalties and min_tokens strong enough to change the greedy tokens: the step launched before the
    previous token was read back must count that token (on the device) exactly as the synchronous
    engine counts it on the host."""
    prompts = {f"p{i}": [3 + i, 17, 29, 5 + 2 * i] for i in range(6)}
    plain = engine(model, False).run_to_completion(
        [GenerationRequest(k, p, SamplingParams(max_tokens=12, temperature=0.0)) for k, p in prompts.items()])

    def params(k):
        if setting == "freq-presence":
            extra = dict(frequency_penalty=2.0, presence_penalty=2.0)
        elif setting == "repetition":
            extra = dict(repetition_penalty=3.0)
        else:  # the second plain token stops the request, but not before 6 tokens
            extra = dict(stop_token_ids=[plain[k][1].token_id], min_tokens=6)
        return SamplingParams(max_tokens=12, temperature=0.0, logprobs=1, **extra)

    def reqs():
        return [GenerationRequest(k, p, params(k)) for k, p in prompts.items()]

    ref = engine(model, False).run_to_completion(reqs())
    eng = engine(model, True)
    got = eng.run_to_completion(reqs())
    assert eng.num_steps_ahead > 5
    assert_same(ref, got)
    changed = sum([e.token_id for e in ref[k]] != [e.token_id for e in plain[k]] for k in ref)
    assert changed >= 3  # the setting really decides tokens here


def test_a_step_is_left_in_flight_and_completed_by_the_next_call(model):
    eng = engine(model, True)
    eng.add_request(GenerationRequest("a", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)))
    first = eng.step()  # the prefill: its token is read back at once (the next step needs admission-free plans)
    assert [e.token_id is not None for e in first] == [True]
    assert eng.step() == []  # a plain decode step: launched, left in flight
    assert eng.has_work() and eng._in_flight is not None
    evs = eng.step()  # launches the next decode with the device-side token, then completes the first
    assert len(evs) == 1 and eng.num_steps_ahead == 1
    rest = []
    while eng.has_work():
        rest += eng.step()
    assert len(first) + len(evs) + len(rest) == 6 and rest[-1].finish_reason == "length"
    ref = engine(model, False).run_to_completion(
        [GenerationRequest("a", [5, 6, 7], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))])["a"]
    assert [e.token_id for e in first + evs + rest] == [e.token_id for e in ref]


def test_abort_while_a_step_is_in_flight(model):
    eng = engine(model, True)
    reqs = [GenerationRequest(f"q{i}", [3 + i, 9, 11, 4], SamplingParams(max_tokens=20, temperature=0.0,
                                                                          ignore_eos=True)) for i in range(4)]
    ref = engine(model, False).run_to_completion(reqs)
    got = {r.request_id: [] for r in reqs}
    for r in reqs:
        eng.add_request(r)
    aborted = None
    while eng.has_work():
        if aborted is None and eng._in_flight is not None and len(got["q1"]) >= 3:
            aborted = eng.abort("q1")
            got["q1"].append(aborted)
        for ev in eng.step():
            got[ev.request_id].append(ev)
    assert aborted is not None and aborted.finish_reason == "abort"
    assert got["q1"][-1] is aborted and not any(e.finished for e in got["q1"][:-1])
    assert [e.token_id for e in got["q1"][:-1]] == [e.token_id for e in ref["q1"][:len(got["q1"]) - 1]]
    for rid in ("q0", "q2", "q3"):
        assert [e.token_id for e in got[rid]] == [e.token_id for e in ref[rid]]
    st = eng.stats()
    assert st.kv_cache_usage == 0.0 and st.num_running == 0


def test_max_model_len_ends_rows_without_a_wasted_launch(model):
    # every sequence hits max_model_len; the continuation never plans a position past it
    kw = dict(max_model_len=24, max_num_seqs=8)
    reqs = [GenerationRequest(f"m{i}", list(range(1, 12 + i)), SamplingParams(max_tokens=100, temperature=0.0,
                                                                               ignore_eos=True)) for i in range(6)]
    ref = engine(model, False, **kw).run_to_completion(reqs)
    eng = engine(model, True, **kw)
    got = eng.run_to_completion(reqs)
    assert_same(ref, got)
    assert all(len(got[r.request_id]) + len(r.prompt_token_ids) == 24 for r in reqs)
    assert eng.stats().kv_cache_usage == 0.0


def test_continuation_is_only_planned_without_admissions_prefills_or_preemption():
    params = SamplingParams(max_tokens=10, temperature=0.0)
    alloc = BlockAllocator(num_blocks=7, block_size=4)  # 6 usable blocks of 4 tokens
    sched = Scheduler(alloc, max_num_seqs=4, max_num_batched_tokens=8, max_model_len=64)
    a = Sequence("a", [1, 2, 3], params)
    b = Sequence("b", [1, 2, 3, 4, 5, 6, 7], params)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()  # a's prompt (3) and 5 of b's 7
    for c in out.chunks:
        c.seq.num_computed = c.end
    a.token_ids.append(9), a.output_token_ids.append(9)
    assert sched.schedule_continuation([a]) is None  # b is still prefilling
    out = sched.schedule()  # a decodes, b's prefill ends: both sample, and their tokens stay pending
    for c in out.chunks:
        c.seq.num_computed = c.end
    nxt = sched.schedule_continuation([a, b])
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in nxt.decodes] == [("a", 4, 1), ("b", 7, 1)]
    assert alloc.holds("a", 5) and alloc.num_free_blocks == 2  # a's second block, for position 4
    sched.add(Sequence("c", [1], params))
    assert sched.schedule_continuation([a, b]) is None  # an admission needs the tokens first
    sched.abort("c")
    # growth without a free block would need a preemption: no plan (the synchronous path decides)
    alloc.grow("a", 16)
    assert alloc.num_free_blocks == 0
    b.token_ids.append(9), b.output_token_ids.append(9)  # b's pending token is now at position 8
    assert sched.schedule_continuation([a, b]) is None
    # a sequence whose pending token is certainly its last is left out
    a.params = SamplingParams(max_tokens=len(a.output_token_ids) + 1, temperature=0.0)
    sched.abort("b")
    assert sched.schedule_continuation([a]) is None
    a.params = params
    # max_model_len 5: a's pending token (position 4) is its last
    sched.max_model_len = 5
    assert sched.schedule_continuation([a]) is None
    sched.max_model_len = 6
    assert [c.start for c in sched.schedule_continuation([a]).decodes] == [4]


def test_min_tokens_counts_a_pending_token():
    s = Sampler(eos_token_ids=[2])
    logits = torch.zeros(1, 5)
    logits[0, 2] = 10.0  # EOS is the argmax

    class Row:
        params = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=3)
        generator = None
        prompt_token_ids = [1]
        output_token_ids = [4, 4]

    assert s.launch(logits, [Row()]).result()[0] != [2]  # 2 outputs < 3: EOS masked
    assert s.launch(logits, [Row()], pending_tokens=torch.tensor([4])).result()[0] == [2]  # + the pending one
