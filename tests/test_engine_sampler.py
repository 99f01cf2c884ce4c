"""Sampling: seeded reproducibility alone vs batched, top_k=1 == greedy, penalties (OpenAI semantics),
logit_bias, min_tokens, top-k/top-p nucleus, temperature distribution, raw logprobs."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from server.engine.engine import LLMEngine
from server.engine.sampler import Sampler, make_generator
from server.engine.testing import llama_like_config, random_state_dict
from server.engine.types import GenerationRequest, SamplingParams

torch.set_num_threads(1)


@dataclass
class Row:
    params: SamplingParams
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None


@pytest.fixture(scope="module")
def engine():
    cfg = llama_like_config()
    return LLMEngine(cfg, random_state_dict(cfg, seed=8), kv_cache_bytes=1 << 21, block_size=8, max_num_seqs=16,
                     max_num_batched_tokens=64)


def run(eng, reqs):
    res = eng.run_to_completion(reqs)
    return {k: [e.token_id for e in v] for k, v in res.items()}


def test_seeded_sampling_is_reproducible_alone_and_batched(engine):
    sp = dict(max_tokens=20, temperature=1.0, top_p=0.95, ignore_eos=True)
    target = GenerationRequest("t", [5, 6, 7, 8], SamplingParams(seed=1234, **sp))
    alone = run(engine, [target])["t"]
    again = run(engine, [GenerationRequest("t", [5, 6, 7, 8], SamplingParams(seed=1234, **sp))])["t"]
    assert alone == again
    others = [GenerationRequest(f"o{i}", [i + 1] * (3 + i), SamplingParams(seed=(None if i % 2 else i), **sp))
              for i in range(9)]
    batched = run(engine, [GenerationRequest("t", [5, 6, 7, 8], SamplingParams(seed=1234, **sp))] + others)
    assert batched["t"] == alone
    other_seed = run(engine, [GenerationRequest("t", [5, 6, 7, 8], SamplingParams(seed=99, **sp))])["t"]
    assert other_seed != alone  # the seed matters (20 draws at temperature 1)


def test_top_k_1_equals_greedy(engine):
    p = [9, 8, 7, 6, 5]
    g = run(engine, [GenerationRequest("g", p, SamplingParams(max_tokens=15, temperature=0.0, ignore_eos=True))])
    k = run(engine, [GenerationRequest("g", p, SamplingParams(max_tokens=15, temperature=1.7, top_k=1,
                                                              ignore_eos=True))])
    assert g["g"] == k["g"]


def test_engine_logprobs_are_raw_even_with_penalties_and_temperature(engine):
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    r = GenerationRequest("l", p, SamplingParams(max_tokens=6, temperature=0.7, seed=3, logprobs=4,
                                                 presence_penalty=1.0, repetition_penalty=1.3, ignore_eos=True))
    ev = engine.run_to_completion([r])["l"]
    toks = [e.token_id for e in ev]
    ref = engine.score([p + toks])[0]
    for i, e in enumerate(ev):
        row = ref[len(p) - 1 + i]
        assert e.logprob.logprob == pytest.approx(float(row[e.token_id]), abs=1e-4)
        top = row.topk(4)
        assert list(e.logprob.top)[:4] == top.indices.tolist()
        assert e.token_id in e.logprob.top


def test_penalties_bias_and_min_tokens_exact_values():
    V = 10
    base = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0, -1.0, 1.9, 1.5, -0.5]])
    s = Sampler(eos_token_ids=[9])
    # frequency / presence: output tokens [3, 3, 5]; prompt tokens do not count (OpenAI)
    row = Row(SamplingParams(frequency_penalty=0.5, presence_penalty=1.0), prompt_token_ids=[0, 7],
              output_token_ids=[3, 3, 5])
    out = s.process_logits(base, [row])[0]
    exp = base[0].clone()
    exp[3] -= 2 * 0.5 + 1.0
    exp[5] -= 1 * 0.5 + 1.0
    torch.testing.assert_close(out, exp)
    # repetition penalty: prompt AND output tokens; positive divided, negative multiplied
    row = Row(SamplingParams(repetition_penalty=2.0), prompt_token_ids=[0, 1], output_token_ids=[6])
    out = s.process_logits(base, [row])[0]
    exp = base[0].clone()
    exp[0], exp[1], exp[6] = 1.0, -4.0, -2.0
    torch.testing.assert_close(out, exp)
    # logit bias; min_tokens suppresses EOS and stop ids until reached (and not after)
    row = Row(SamplingParams(logit_bias={4: 5.0, 2: -100.0}, min_tokens=2, stop_token_ids=[8]),
              output_token_ids=[1])
    out = s.process_logits(base, [row])[0]
    assert out[4] == 5.0 and out[2] == -99.0
    assert out[8] == -math.inf and out[9] == -math.inf and out[0] == 2.0
    row.output_token_ids = [1, 1]
    out = s.process_logits(base, [row])[0]
    assert out[8] == 1.5 and out[9] == -0.5
    # ignore_eos: EOS no longer suppressed, explicit stop ids still are
    row = Row(SamplingParams(min_tokens=2, stop_token_ids=[8], ignore_eos=True))
    out = s.process_logits(base, [row])[0]
    assert out[8] == -math.inf and out[9] == -0.5
    # rows in a batch do not affect each other
    rows = [Row(SamplingParams(presence_penalty=1.0), output_token_ids=[0]), Row(SamplingParams())]
    out = s.process_logits(base.repeat(2, 1), rows)
    assert out[0, 0] == 1.0 and torch.equal(out[1], base[0])
    # greedy picks the penalized argmax
    toks, lps = s(base, [Row(SamplingParams(temperature=0.0, presence_penalty=2.0, logprobs=2),
                             output_token_ids=[5])])
    assert toks == [0] and lps[0].token_id == 0
    assert lps[0].logprob == pytest.approx(float(torch.log_softmax(base, -1)[0, 0]))
    assert list(lps[0].top) == [5, 0]  # raw top-2: token 5 (3.0) then 0 (2.0)
    assert len(s.process_logits(base, [Row(SamplingParams())])[0]) == V


def test_top_k_top_p_restrict_support_and_temperature_matches_softmax():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()[None]
    s = Sampler()
    n = 3000
    g = make_generator(7, "cpu")

    def draw(params):
        row = Row(params, generator=g)
        counts = torch.zeros(4)
        for _ in range(n):
            counts[s(logits, [row])[0][0]] += 1
        return counts / n

    f = draw(SamplingParams(top_p=0.7))  # nucleus {0, 1}
    assert f[2] == 0 and f[3] == 0
    assert f[0] == pytest.approx(0.5 / 0.8, abs=0.04)
    f = draw(SamplingParams(top_k=3))
    assert f[3] == 0 and f[0] == pytest.approx(0.5 / 0.95, abs=0.04)
    f = draw(SamplingParams(temperature=2.0))
    exp = torch.softmax(logits[0] / 2.0, -1)
    torch.testing.assert_close(f, exp, atol=0.04, rtol=0)
    f = draw(SamplingParams(temperature=1.0))
    torch.testing.assert_close(f, probs, atol=0.04, rtol=0)


def test_seeded_rows_independent_of_batch_position():
    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0))
    s = Sampler()

    def seq(batch_extra: int, seed=5):
        g = make_generator(seed, "cpu")
        out = []
        for _ in range(30):
            rows = [Row(SamplingParams(temperature=1.0), generator=None) for _ in range(batch_extra)]
            rows.insert(batch_extra // 2, Row(SamplingParams(temperature=1.0), generator=g))
            toks, _ = s(logits.repeat(len(rows), 1), rows)
            out.append(toks[batch_extra // 2])
        return out

    a = seq(0)
    assert a == seq(5) == seq(12)
    assert len(set(a)) > 5  # actually random
