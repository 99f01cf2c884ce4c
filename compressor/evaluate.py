"""Evaluation harness of ``modegpt eval``: WikiText-2 perplexity and zero-shot multiple choice.

Protocols
---------
``wikitext2`` (GPTQ / SliceGPT perplexity)
    The test text is ``"\\n\\n".join(rows)`` of ``wikitext-2-raw-v1`` (see
    :func:`compressor.datasets.wikitext2_text`), tokenized once without special tokens, cut into
    non-overlapping ``seqlen``-token windows; the last partial window is dropped. Every window is
    scored independently; ``ppl = exp(mean NLL over all predicted tokens)``, i.e. over the
    ``seqlen - 1`` next-token predictions of each window (equal to GPTQ's mean of per-window mean
    losses, since all windows have the same length). ``limit`` keeps only the first windows.

``piqa``, ``arc_easy``, ``arc_challenge`` (lm-evaluation-harness 0.4, zero-shot)
    Prompts come from :func:`compressor.datasets.load_task` (``"Question: ...\\nAnswer:"``), the
    continuation of each choice is ``" " + choice``. Tokenization is lm-eval's ``_encode_pair``:
    trailing whitespace of the context moves to the continuation, then
    ``context_enc = tok(context)`` and ``continuation_enc = tok(context + continuation)[len(context_enc):]``.
    The loglikelihood of a choice is the sum of the log-probabilities of its continuation tokens;
    inputs longer than ``seqlen`` are left-truncated (never the case for these tasks).
    ``acc`` takes the argmax of the summed loglikelihoods, ``acc_norm`` the argmax of the
    loglikelihood divided by ``len(choice)`` in characters (the choice string without the leading
    space), ties going to the first choice, exactly as lm-eval's ``process_results``.
    ``limit`` keeps the first ``limit`` items of each task.

Special tokens (BOS)
    lm-eval 0.4's ``HFLM`` encodes with ``add_special_tokens=False`` for causal models unless
    ``add_bos_token=True`` is passed (lm-eval forces it only for Gemma), so no BOS is added even
    when the tokenizer would add one by default (e.g. Llama). This module does the same by
    default for both protocols. ``add_bos=True`` prepends ``tokenizer.bos_token_id`` once to
    every multiple-choice input (lm-eval's ``add_bos_token=True``) and once to the WikiText token
    stream (what GPTQ's ``tokenizer(text)`` does for Llama tokenizers: only the first window
    starts with BOS).

Numerics
    Batches are right-padded with an attention mask (padding after the real tokens cannot affect
    a causal model), sorted by length. Log-softmax is taken in float32 on the needed positions
    only. lm-eval takes it in the model dtype, so half-precision models may differ from lm-eval
    in the last digits.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from compressor.datasets import load_task, wikitext2_text

MC_TASKS = ("piqa", "arc_easy", "arc_challenge")
TASKS = ("wikitext2", *MC_TASKS)


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _bos(tokenizer) -> list[int]:
    if tokenizer.bos_token_id is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
    return [tokenizer.bos_token_id]


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval 0.4 ``_encode_pair``: ``(context_enc, continuation_enc)``, no special tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    context_enc = _encode(tokenizer, context)
    whole_enc = _encode(tokenizer, context + continuation)
    return context_enc, whole_enc[len(context_enc):]


@torch.inference_mode()
def loglikelihoods(
    model,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int = 16,
    max_length: int = 2048,
    progress: bool = False,
    desc: str = "loglikelihood",
) -> list[float]:
    """Summed log-probability of each ``continuation_enc`` given its ``context_enc``.

    The model input is ``(context_enc + continuation_enc)[-(max_length + 1):][:-1]``
    (lm-eval's left truncation); the result keeps the order of ``requests``.
    """
    device = _device(model)
    inputs, targets = [], []
    for ctx, cont in requests:
        if not ctx or not cont:
            raise ValueError("context and continuation must both have at least one token")
        inputs.append((ctx + cont)[-(max_length + 1):][:-1])
        targets.append(cont)
    order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
    out = [0.0] * len(requests)
    with tqdm(total=len(requests), desc=desc, disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            width = len(inputs[idx[0]])
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):
                ids[row, :len(inputs[i])] = torch.tensor(inputs[i])
                mask[row, :len(inputs[i])] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for row, i in enumerate(idx):
                n, k = len(inputs[i]), len(targets[i])
                logp = F.log_softmax(logits[row, n - k:n].float(), dim=-1)
                tgt = torch.tensor(targets[i], device=logp.device)
                out[i] = logp.gather(-1, tgt[:, None]).sum().item()
            bar.update(len(idx))
    return out


def multiple_choice(
    model, tokenizer, items, batch_size: int = 16, max_length: int = 2048,
    progress: bool = False, desc: str = "mc", add_bos: bool = False,
) -> dict:
    """Score :class:`~compressor.datasets.McItem` s; returns ``{"acc", "acc_norm", "n"}``."""
    prefix = _bos(tokenizer) if add_bos else []
    requests, spans = [], []
    for item in items:
        spans.append((len(requests), len(item.choices)))
        for choice in item.choices:
            ctx, cont = encode_pair(tokenizer, item.context, " " + choice)
            requests.append((prefix + ctx, cont))
    if not items:
        raise ValueError("no items to score")
    lls = loglikelihoods(model, requests, batch_size, max_length, progress, desc)
    acc = acc_norm = 0
    for item, (first, count) in zip(items, spans):
        ll = np.array(lls[first:first + count])
        lengths = np.array([float(len(c)) for c in item.choices])
        acc += int(np.argmax(ll)) == item.gold
        acc_norm += int(np.argmax(ll / lengths)) == item.gold
    n = len(items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}


@torch.inference_mode()
def perplexity(
    model, tokenizer, text: str, seqlen: int = 2048, limit: int | None = None,
    batch_size: int = 16, progress: bool = False, add_bos: bool = False,
) -> dict:
    """Perplexity of ``text`` over non-overlapping ``seqlen``-token windows (tail dropped).

    Returns ``{"ppl", "nll" (mean per predicted token), "windows", "tokens" (predicted
    tokens = windows * (seqlen - 1)), "seqlen"}``.
    """
    tokens = (_bos(tokenizer) if add_bos else []) + _encode(tokenizer, text)
    windows = len(tokens) // seqlen
    if limit is not None:
        windows = min(windows, limit)
    if windows == 0:
        raise ValueError(f"text has {len(tokens)} tokens: not one full window of {seqlen}")
    data = torch.tensor(tokens[:windows * seqlen]).view(windows, seqlen)
    device = _device(model)
    total_nll = 0.0
    with tqdm(total=windows, desc="wikitext2", disable=not progress) as bar:
        for start in range(0, windows, batch_size):
            batch = data[start:start + batch_size].to(device)
            logits = model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits
            for row in range(batch.shape[0]):  # one row at a time: float32 logits are large
                total_nll += F.cross_entropy(
                    logits[row, :-1].float(), batch[row, 1:], reduction="sum"
                ).item()
            bar.update(batch.shape[0])
    n_pred = windows * (seqlen - 1)
    nll = total_nll / n_pred
    return {"ppl": math.exp(nll), "nll": nll, "windows": windows, "tokens": n_pred, "seqlen": seqlen}


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 16,
    seqlen: int = 2048,
    progress: bool = True,
    *,
    add_bos: bool = False,
) -> dict:
    """Evaluate a Hugging Face causal LM on ``tasks`` (any of :data:`TASKS`).

    Returns ``{"wikitext2": {"ppl", "nll", "windows", "tokens", "seqlen", "protocol"},
    "piqa": {"acc", "acc_norm", "n"}, ...}``; see the module docstring for the protocols.
    ``limit`` caps WikiText windows and items per multiple-choice task. The model is put in
    eval mode for the duration of the call.
    """
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; expected some of {TASKS}")
    was_training = model.training
    model.eval()
    results = {}
    try:
        for task in tasks:
            if task == "wikitext2":
                res = perplexity(model, tokenizer, wikitext2_text("test"), seqlen, limit,
                                 batch_size, progress, add_bos)
                res["protocol"] = (
                    f"gptq: wikitext-2-raw-v1 test, '\\n\\n'.join(rows), tokenized once "
                    f"({'BOS + ' if add_bos else ''}no special tokens), non-overlapping "
                    f"{seqlen}-token windows, last partial window dropped, "
                    "ppl = exp(mean NLL over predicted tokens)"
                )
            else:
                items = load_task(task)[:limit]
                res = multiple_choice(model, tokenizer, items, batch_size, seqlen,
                                      progress, task, add_bos)
            results[task] = res
    finally:
        model.train(was_training)
    return results


def average_accuracy(results: dict, metric: str = "acc_norm") -> float:
    """Mean of ``metric`` over the multiple-choice tasks present in ``results``."""
    values = [results[t][metric] for t in MC_TASKS if t in results]
    if not values:
        raise ValueError(f"no multiple-choice results with {metric!r} in {sorted(results)}")
    return float(np.mean(values))
