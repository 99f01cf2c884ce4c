"""Optional low-rank factorization of the LM head and the input embedding (``--head-rank-ratio``).

Off by default: on SmolLM2-135M it costs far more quality per removed parameter than compressing the
decoder blocks further (``docs/COMPRESSION.md``, "LM head and embedding factorization").

- **LM head**: activation-aware (SVD-LLM) whitened SVD, :func:`compressor.decompose.whitened_svd`
  with ``C`` the correlation of the final normed hidden states on the calibration set, so
  ``W ~ B A`` minimises ``||(W - B A) C^1/2||_F``, the expected squared logit error.
- **Input embedding** (when it is not the head's): plain truncated SVD (``C = I``), the optimum of the
  row error summed over the vocabulary. Token-frequency weighting is not used: the CPU calibration set
  (8192 tokens) contains 2417 distinct tokens, 5% of SmolLM2's vocabulary, so the weights would fit
  the calibration domain and leave every other token to chance.
- **Tied embeddings** (SmolLM2): one shared factorization ``E ~ B A`` (stored once as
  ``model.embed_tokens.weight_a/weight_b``) serves both: ``embed = B[ids] @ A`` and
  ``logits = (h @ A.T) @ B.T``; it uses the head's whitened metric (measured better than plain SVD
  and than untying). ``head_untie`` factorizes the two separately (head whitened, embedding plain) and
  stores both, so it needs half the rank for the same parameter count.

The rank is the kept fraction of the full rank ``min(vocab, hidden)``, rounded to ``align``. A
factorized ``[vocab, hidden]`` matrix stores ``r (vocab + hidden)`` parameters, fewer than
``vocab * hidden`` only below ``r = vocab * hidden / (vocab + hidden)`` (99% of ``hidden`` for
SmolLM2); ``keep = 1`` is exact (tests) but larger.
"""
from __future__ import annotations

import torch

from .decompose import whitened_svd
from .modeling import ModeGPTConfig, make_norm

EMBED, HEAD = "model.embed_tokens", "lm_head"


def head_rank(cfg: dict, keep: float, align: int = 8) -> int:
    """The rank keeping the fraction ``keep`` in (0, 1] of the full rank ``min(vocab, hidden)``."""
    if not 0 < keep <= 1:
        raise ValueError(f"head rank ratio must be in (0, 1], got {keep}")
    full = min(cfg["vocab_size"], cfg["hidden_size"])
    align = max(1, align)
    return min(full, max(align, align * round(keep * full / align)))


@torch.inference_mode()
def final_hidden_correlation(cfg: ModeGPTConfig, globals_: dict[str, torch.Tensor], stream) -> torch.Tensor:
    """``E[h h^T]`` (float64) of ``h = norm(x_L)``, the LM head's input, over the calibration stream
    (``pipeline._Stream`` holding the output of the last decoder layer)."""
    norm = make_norm(cfg)
    prefix = "model.norm."
    norm.load_state_dict({k[len(prefix):]: v for k, v in globals_.items() if k.startswith(prefix)}, assign=True)
    d = cfg.hidden_size
    c = torch.zeros(d, d, dtype=torch.float64, device=stream.x.device)
    tokens = 0
    for sl in stream.chunks():
        h = norm(stream.x[sl]).flatten(0, 1).double()
        c += h.T @ h
        tokens += h.shape[0]
    return c / tokens


def _factors(w: torch.Tensor, c: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = whitened_svd(w.to(c.device), c, rank)
    return a.to(w.device, w.dtype), b.to(w.device, w.dtype)


def whitened_error(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> float:
    """Relative output error ``||(W - B A) C^1/2||_F / ||W C^1/2||_F`` (float64)."""
    w, a, b = (t.to(c.device, c.dtype) for t in (w, a, b))
    d = w - b @ a
    return float(((d @ c) * d).sum().clamp_min(0).sqrt() / ((w @ c) * w).sum().sqrt())


def factorize_head(cfg: dict, state: dict[str, torch.Tensor], c_head: torch.Tensor, rank: int,
                   untie: bool = False, whiten: bool = True) -> tuple[dict, dict, dict]:
    """Replace the LM head and the embedding of a checkpoint ``(cfg, state)`` by rank-``rank`` factors.

    ``c_head``: correlation of the head's input (:func:`final_hidden_correlation`); ``whiten=False``
    uses plain SVD for the head too. Returns new ``(cfg, state, report)``.
    """
    tied = bool(cfg.get("tie_word_embeddings"))
    eye = torch.eye(c_head.shape[0], dtype=c_head.dtype, device=c_head.device)
    state, ranks = dict(state), dict(cfg.get("linear_ranks") or {})
    embed_w = state.pop(EMBED + ".weight")
    head_w = embed_w if tied else state.pop(HEAD + ".weight")
    shared = tied and not untie
    head = _factors(head_w, c_head if whiten else eye, rank)
    embed = head if shared else _factors(embed_w, eye, rank)
    if not shared:
        state[HEAD + ".weight_a"], state[HEAD + ".weight_b"] = head
        ranks[HEAD] = rank
    state[EMBED + ".weight_a"], state[EMBED + ".weight_b"] = embed
    ranks[EMBED] = rank
    report = {
        "rank": rank, "shared": shared, "untied": tied and untie, "whiten": whiten,
        "head_output_error": whitened_error(head_w, *head, c_head),
        "embedding_error": whitened_error(embed_w, *embed, eye),
    }
    return dict(cfg, linear_ranks=ranks, tie_word_embeddings=shared), state, report
