"""AsyncEngine: two models side by side in one process, streaming equals the synchronous engine, the
event loop stays responsive, client disconnect aborts and frees the cache, score() runs alongside."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from server.engine.async_engine import AsyncEngine
from server.engine.engine import LLMEngine
from server.engine.testing import byte_tokenizer, llama_like_config, opt_like_config, random_state_dict
from server.engine.types import GenerationRequest, SamplingParams

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def setup(request):
    tok = byte_tokenizer()
    models = {}
    for name, cfg in (("llama", llama_like_config()), ("opt", opt_like_config())):
        sd = random_state_dict(cfg, seed=31)
        models[name] = (cfg, sd)
    engines = {name: AsyncEngine(name, cfg, sd, tok, device="cpu", dtype=torch.float32, kv_cache_bytes=1 << 21,
                                 max_model_len=128, block_size=8, max_num_seqs=16, max_num_batched_tokens=64,
                                 async_scheduling=request.param)
               for name, (cfg, sd) in models.items()}
    for e in engines.values():
        e.start()
    yield tok, models, engines
    for e in engines.values():
        e.shutdown()
    assert not any(e.is_running for e in engines.values())


def req(rid, prompt, n, **kw):
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                                         logprobs=1, **kw))


async def collect(engine, r):
    return [ev async for ev in engine.generate(r)]


def test_two_models_stream_concurrently_and_match_sync_engine(setup):
    tok, models, engines = setup
    prompts = [tok.encode(t) for t in ("the quick brown fox", "hello world", "a model compressed", "tokens")]

    async def main():
        ticks = 0
        stop = False

        async def ticker():  # the event loop must keep running while the engines compute
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        jobs = [collect(engines[m], req(f"{m}-{i}", p, 12)) for m in engines for i, p in enumerate(prompts)]
        res = await asyncio.gather(*jobs)
        stop = True
        await t
        return res, ticks

    res, ticks = asyncio.run(main())
    assert ticks > 10
    keys = [(m, i) for m in engines for i in range(len(prompts))]
    for (m, i), evs in zip(keys, res):
        cfg, sd = models[m]
        ref = LLMEngine(cfg, sd, kv_cache_bytes=1 << 21, max_model_len=128, block_size=8).run_to_completion(
            [req("x", prompts[i], 12)])["x"]
        assert [e.token_id for e in evs] == [e.token_id for e in ref]
        assert evs[-1].finished and evs[-1].finish_reason == "length"
        assert all(not e.finished for e in evs[:-1])
        for a, b in zip(evs, ref):
            assert a.logprob.logprob == pytest.approx(b.logprob.logprob, abs=1e-4)
    for m, e in engines.items():
        st = e.stats()
        assert st.generation_tokens_total >= 12 * len(prompts)
        assert st.num_running == 0 and st.kv_cache_usage == 0.0
    assert engines["llama"].max_model_len == 128 and engines["llama"].eos_token_id == tok.eos_token_id
    for e in engines.values():  # with async scheduling, decode steps really were launched ahead
        assert (e.engine.num_steps_ahead > 0) == e.engine.async_scheduling


def test_client_disconnect_aborts_and_frees_cache(setup):
    tok, _, engines = setup
    eng = engines["llama"]

    async def main():
        gen = eng.generate(req("dc", tok.encode("hello world, hello tokens"), 100))
        got = []
        async for ev in gen:
            got.append(ev)
            if len(got) == 3:
                break
        await gen.aclose()  # what a disconnecting client's handler does
        for _ in range(200):
            if eng.stats().num_running == 0:
                break
            await asyncio.sleep(0.01)
        return got

    got = asyncio.run(main())
    assert len(got) == 3
    st = eng.stats()
    assert st.num_running == 0 and st.num_waiting == 0 and st.kv_cache_usage == 0.0


def test_explicit_abort_ends_stream_with_abort_event(setup):
    tok, _, engines = setup
    eng = engines["opt"]

    async def main():
        evs = []
        async for ev in eng.generate(req("ab", tok.encode("the lazy dog"), 100)):
            evs.append(ev)
            if len(evs) == 2:
                eng.abort("ab")
        return evs

    evs = asyncio.run(main())
    assert evs[-1].finished and evs[-1].finish_reason == "abort"
    assert 2 <= len(evs) < 100
    assert eng.stats().kv_cache_usage == 0.0


def test_score_matches_sync_engine_and_invalid_requests_raise(setup):
    tok, models, engines = setup
    seqs = [tok.encode("the quick brown fox jumps"), tok.encode("hello")]

    async def main():
        gen_task = asyncio.gather(*[collect(engines["llama"], req(f"g{i}", seqs[0], 20)) for i in range(3)])
        scores = await engines["llama"].score(seqs)
        await gen_task
        with pytest.raises(ValueError):
            async for _ in engines["llama"].generate(req("bad", [10 ** 6], 3)):
                pass
        return scores

    scores = asyncio.run(main())
    cfg, sd = models["llama"]
    ref = LLMEngine(cfg, sd, kv_cache_bytes=1 << 20).score(seqs)
    for a, b in zip(scores, ref):
        assert a.shape == (len(a), cfg["vocab_size"]) and a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.exp().sum(-1), torch.ones(len(a)), atol=1e-4, rtol=0)
    assert engines["llama"].score_sync([seqs[1]])[0].shape == (len(seqs[1]), cfg["vocab_size"])
    assert engines["llama"].stats().num_score_sequences_total >= 3


def test_shutdown_aborts_in_flight_requests():
    cfg = llama_like_config()
    eng = AsyncEngine("tmp", cfg, random_state_dict(cfg), None, dtype=torch.float32, kv_cache_bytes=1 << 20,
                      max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16)

    async def main():
        agen = eng.generate(req("s", list(range(100)), 150))
        first = await agen.__anext__()
        eng.shutdown()
        rest = [ev async for ev in agen]
        return first, rest

    t0 = time.time()
    first, rest = asyncio.run(main())
    assert first.request_id == "s" and rest and rest[-1].finish_reason == "abort"
    assert time.time() - t0 < 30 and not eng.is_running


def test_a_shut_down_engine_is_not_restarted_by_requests():
    """A request that reaches an engine after shutdown() (a late request racing a graceful shutdown)
    fails with EngineStoppedError; it does not restart the thread. An explicit start() does."""
    from server.engine.types import EngineStoppedError

    cfg = llama_like_config()
    eng = AsyncEngine("tmp", cfg, random_state_dict(cfg), None, dtype=torch.float32, kv_cache_bytes=1 << 20,
                      max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    assert not eng.is_running
    first = asyncio.run(collect(eng, req("lazy", [1, 2, 3], 2)))  # never started: the first request starts it
    assert first[-1].finished and eng.is_running
    eng.shutdown()
    with pytest.raises(EngineStoppedError):
        asyncio.run(collect(eng, req("late", [1, 2, 3], 2)))
    with pytest.raises(EngineStoppedError):
        eng.submit_score([[1, 2, 3]])
    assert not eng.is_running
    eng.start()
    again = asyncio.run(collect(eng, req("late", [1, 2, 3], 2)))  # the same id is free again
    assert [e.token_id for e in again] == [e.token_id for e in first]
    eng.shutdown()


def test_a_crashed_engine_thread_fails_requests_instead_of_hanging():
    """A failure of the engine thread outside a step (on the H200: set_device on a device without an
    index, at thread start) ends every waiting request with finish_reason "error" and fails score
    calls; the thread survives it, and once the fault is gone it serves again."""
    cfg = llama_like_config()
    eng = AsyncEngine("crashy", cfg, random_state_dict(cfg), None, dtype=torch.float32, kv_cache_bytes=1 << 20,
                      max_model_len=64, max_num_seqs=2, max_num_batched_tokens=16)
    crashes = []

    def broken_ctx():
        crashes.append(1)
        raise RuntimeError("device setup failed")

    eng._device_ctx = broken_ctx  # what the thread enters first; the fault hook only covers steps
    t0 = time.time()
    failed = asyncio.run(asyncio.wait_for(collect(eng, req("r", [1, 2, 3], 4)), 20))
    assert failed[-1].finished and failed[-1].finish_reason == "error" and crashes
    with pytest.raises(RuntimeError, match="failed"):
        eng.submit_score([[1, 2, 3]]).result(20)
    assert time.time() - t0 < 20
    del eng._device_ctx  # repaired: the retrying thread serves the next request
    ok = asyncio.run(asyncio.wait_for(collect(eng, req("r2", [1, 2, 3], 4)), 60))
    assert ok[-1].finish_reason == "length" and len(ok) == 4
    eng.shutdown()
