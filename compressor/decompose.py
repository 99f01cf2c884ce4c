"""The three closed forms of MoDeGPT, as pure tensor functions (float64 in, float64 out).

HF layout throughout: a linear's weight is ``[out, in]`` and ``y = x @ W.T + b``. The paper's notation
(``W_U`` ``[d_h, d_int]``, ``W_D`` ``[d_int, d_h]``, ...) is the transpose. Each function keeps the
original weights untouched when asked to keep everything, so ratio 0 is the identity exactly.

- Type I (MLP, Nystrom): keep the top-k ridge-leverage channels of the intermediate activation's
  correlation ``C``, then refit ``down`` by least squares: ``W_D <- (S^T C S)^+ S^T C W_D``.
- Type II (query-key, CR decomposition): keep, per KV head, the head dimensions with the largest
  ``||Q_j|| * ||K_j||`` (column norms of the query/key activations); RoPE pairs are scored and kept as
  a unit, and under GQA one selection serves the KV head and all its query heads.
- Type III (value-output, SVD): per KV head, the rank-k optimum of the whitened product
  ``||C^1/2 (W_V W_O - W_V' W_O')||_F`` (Eckart-Young), with one basis shared by all query heads of
  the group (their ``W_O`` blocks concatenated); the value bias folds into the output bias exactly.

Also the activation-whitened truncated SVD of one linear (SVD-LLM), shared by the ``svd`` baseline
(``baselines.py``) and the optional LM head / embedding factorization (``head.py``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _mean_diag(c: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(c).mean().clamp_min(torch.finfo(c.dtype).tiny)


def ridge_leverage_scores(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """``diag(C (C + lam I)^-1)`` with the scale-aware ``lam = ridge * tr(C) / n``.

    Uses ``diag(C (C+lam I)^-1) = 1 - lam * diag((C+lam I)^-1)`` and a Cholesky factorisation.
    Making ``lam`` relative to the mean eigenvalue keeps the scores meaningful whatever the scale of
    the activations (wide MLPs, un-normalised correlations), the failure mode of public ports.
    """
    n = c.shape[0]
    lam = ridge * _mean_diag(c)
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    chol = torch.linalg.cholesky(c + lam * eye)
    return 1.0 - lam * torch.diagonal(torch.cholesky_inverse(chol))


def psd_solve(a: torch.Tensor, b: torch.Tensor, rel_ridge: float = 1e-12) -> torch.Tensor:
    """Solve ``A X = B`` for symmetric PSD ``A``; a vanishing ridge makes singular ``A`` give the
    minimum-norm least-squares solution in the limit (the pseudo-inverse of the paper)."""
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a + rel_ridge * _mean_diag(a) * eye)
    if int(info) != 0:
        return torch.linalg.pinv(a, hermitian=True) @ b
    return torch.cholesky_solve(b, chol)


@dataclass
class MlpResult:
    index: torch.Tensor  # kept intermediate channels, ascending
    down: torch.Tensor  # refit down_proj weight [d_h, k]
    scores: torch.Tensor


def nystrom_mlp(c: torch.Tensor, down: torch.Tensor, keep: int, ridge: float, damping: float = 0.0) -> MlpResult:
    """Type I. ``c``: correlation of the activation entering ``down`` ``[n, n]``; ``down``: ``[d_h, n]``.

    ``damping`` (0 = the paper) shrinks the refit towards the kept original columns:
    ``min_B ||a W_D - a_S B||^2 + mu ||B - S^T W_D||^2`` with ``mu = damping * tr(C) / n``;
    ``damping = inf`` keeps the selected columns without refit.
    """
    n = c.shape[0]
    scores = ridge_leverage_scores(c, ridge)
    if keep >= n:
        return MlpResult(torch.arange(n, device=c.device), down.to(c.dtype), scores)
    index = torch.topk(scores, keep).indices.sort().values
    w_d = down.to(c.dtype).T  # paper's W_D [n, d_h]
    if damping == float("inf"):
        return MlpResult(index, w_d[index].T.contiguous(), scores)
    c_ss = c[index][:, index]  # S^T C S
    rhs = c[index] @ w_d  # S^T C W_D
    if damping > 0:
        mu = damping * _mean_diag(c)
        c_ss = c_ss + mu * torch.eye(keep, dtype=c.dtype, device=c.device)
        rhs = rhs + mu * w_d[index]
    refit = psd_solve(c_ss, rhs)  # [k, d_h]
    return MlpResult(index, refit.T.contiguous(), scores)


def qk_select(q_sq: torch.Tensor, k_sq: torch.Tensor, keep: int, rope: bool) -> list[list[int]]:
    """Type II selection. ``q_sq [H, d]`` / ``k_sq [Hkv, d]``: per-dimension sums of squares of the
    query/key activations (the diagonals of ``C_Q``, ``C_K``; ``||C^1/2[:, j]|| = sqrt(C_jj)``).

    Returns, per KV head, the kept dimensions: ascending for plain heads, and
    ``[p_1..p_m, p_1+d/2..p_m+d/2]`` (pairs ascending) for RoPE heads, where ``keep`` must be even.
    A RoPE pair is scored by the norms of its 2-D block, ``||Q_p||_F ||K_p||_F``, which is invariant
    to the rotation, so pre-RoPE activations give the same scores as post-RoPE ones.
    """
    n_heads, d = q_sq.shape
    n_kv = k_sq.shape[0]
    group = n_heads // n_kv
    if rope and keep % 2:
        raise ValueError(f"a RoPE head keeps whole pairs: qk dim {keep} must be even")
    out = []
    for g in range(n_kv):
        q_norm = q_sq[g * group : (g + 1) * group]
        k_norm = k_sq[g]
        if rope:
            half = d // 2
            qp = (q_norm[:, :half] + q_norm[:, half:]).sqrt()
            kp = (k_norm[:half] + k_norm[half:]).sqrt()
            score = kp * qp.sum(0)  # CR importance summed over the query heads of the group
            pairs = torch.topk(score, keep // 2).indices.sort().values.tolist()
            out.append(pairs + [p + half for p in pairs])
        else:
            score = k_norm.sqrt() * q_norm.sqrt().sum(0)
            out.append(torch.topk(score, keep).indices.sort().values.tolist())
    return out


def gather_qk(w: torch.Tensor, b: torch.Tensor | None, index: list[list[int]], head_dim: int,
              heads_per_index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of a q or k projection for the kept dims; head ``h`` uses ``index[h // heads_per_index]``."""
    n_heads = w.shape[0] // head_dim
    rows = torch.tensor(
        [h * head_dim + j for h in range(n_heads) for j in index[h // heads_per_index]], device=w.device
    )
    return w[rows], (b[rows] if b is not None else None)


@dataclass
class VoResult:
    v_weight: torch.Tensor  # [Hkv * k, d_h]
    v_bias: torch.Tensor | None  # zero after compression (folded into o_bias)
    o_weight: torch.Tensor  # [d_h, H * k]
    o_bias: torch.Tensor | None  # original o bias plus the folded value bias
    singular_values: list[torch.Tensor]


def svd_vo(c: torch.Tensor, v_w: torch.Tensor, v_b: torch.Tensor | None, o_w: torch.Tensor,
           o_b: torch.Tensor | None, n_heads: int, n_kv: int, keep: int) -> VoResult:
    """Type III. ``c``: correlation of the input of ``v_proj`` ``[d_h, d_h]``.

    For KV head g with query heads G: ``M = W_V [W_O,h for h in G]`` (``[d_h, |G| d_h]``, rank <= d).
    With ``R^T R = W_V^T C W_V`` (eigendecomposition, ``d x d``), ``C^1/2 W_V R^-1`` is orthonormal, so
    the SVD of the small ``R [W_O,h]`` gives the SVD of ``C^1/2 M``; truncating it is the Eckart-Young
    optimum and ``W_V' = W_V R^-1 U_k`` stays a projection of the input (no ``C^-1/2`` is formed).
    Singular values fold into ``W_O'``.
    """
    dt = c.dtype
    d = v_w.shape[0] // n_kv
    group = n_heads // n_kv
    if keep >= d:
        return VoResult(v_w.to(dt), _opt(v_b, dt), o_w.to(dt), _opt(o_b, dt), [])
    o_bias = _opt(o_b, dt)
    if v_b is not None:  # softmax rows sum to one: P (X W_V + 1 b) W_O = P X W_V W_O + 1 (b W_O)
        fold = o_w.to(dt) @ v_b.to(dt).view(n_kv, 1, d).expand(n_kv, group, d).reshape(-1)
        o_bias = fold if o_bias is None else o_bias + fold
    new_v, new_o, sigmas = [], [None] * n_heads, []
    for g in range(n_kv):
        w_v = v_w[g * d : (g + 1) * d].to(dt).T  # [d_h, d]
        heads = range(g * group, (g + 1) * group)
        w_o = torch.cat([o_w[:, h * d : (h + 1) * d].to(dt).T for h in heads], dim=1)  # [d, |G| d_h]
        evals, evecs = torch.linalg.eigh(w_v.T @ c @ w_v)
        evals = evals.clamp_min(0)
        tol = evals.max() * d * torch.finfo(dt).eps
        inv_sqrt = torch.where(evals > tol, evals.rsqrt(), torch.zeros_like(evals))
        r = evals.sqrt()[:, None] * evecs.T  # R, with R^T R = W_V^T C W_V
        u, s, vh = torch.linalg.svd(r @ w_o, full_matrices=False)
        new_v.append((w_v @ (evecs * inv_sqrt) @ u[:, :keep]).T)  # [k, d_h]
        o_cat = s[:keep, None] * vh[:keep]  # [k, |G| d_h]
        for i, h in enumerate(heads):
            new_o[h] = o_cat[:, i * o_w.shape[0] : (i + 1) * o_w.shape[0]].T  # [d_h, k]
        sigmas.append(s)
    v_bias = None if v_b is None else torch.zeros(n_kv * keep, dtype=dt, device=c.device)
    return VoResult(torch.cat(new_v), v_bias, torch.cat(new_o, dim=1), o_bias, sigmas)


def whitened_svd(w: torch.Tensor, c: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(A [r, in], B [out, r])`` minimising ``||(W - B A) C^1/2||_F`` (SVD-LLM whitening).

    With ``C = L L^T`` (Cholesky, a vanishing ridge), ``W ~ U_r S_r V_r^T L^-1`` where ``W L = U S V^T``: the
    rank-r optimum of the output error ``||(W - W') X^T||`` on inputs with correlation ``C``. ``C = I`` gives
    the plain truncated SVD. Used by the ``svd`` baseline and the LM head factorization (``head.py``)."""
    n = c.shape[0]
    eye = torch.eye(n, dtype=c.dtype, device=c.device)
    chol = torch.linalg.cholesky(c + 1e-6 * torch.diagonal(c).mean() * eye)
    u, s, vh = torch.linalg.svd(w.to(c.dtype) @ chol, full_matrices=False)
    a = torch.linalg.solve_triangular(chol, vh[:rank], upper=False, left=False)  # V_r^T L^-1
    return a, u[:, :rank] * s[:rank]


def _opt(t: torch.Tensor | None, dt: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dt)
