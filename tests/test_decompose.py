"""Each MoDeGPT closed form against an independent brute-force computation on small random problems."""
import itertools

import pytest
import torch

from compressor.decompose import gather_qk, nystrom_mlp, qk_select, ridge_leverage_scores, svd_vo



@pytest.fixture(autouse=True)
def float64_default():
    """These checks run in float64; the default dtype is restored for the other test modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _activations(t: int, n: int, gen) -> torch.Tensor:
    """Correlated, unevenly scaled activations (so selections are not ties)."""
    mix = torch.randn(n, n, generator=gen) * torch.logspace(0, -2, n)[:, None]
    return torch.randn(t, n, generator=gen) @ mix


def test_ridge_leverage_scores_match_definition():
    gen = torch.Generator().manual_seed(1)
    a = _activations(200, 12, gen)
    c = a.T @ a / 200
    lam = 0.05 * torch.diagonal(c).mean()
    expected = torch.diagonal(c @ torch.linalg.inv(c + lam * torch.eye(12)))
    torch.testing.assert_close(ridge_leverage_scores(c, 0.05), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("keep", [3, 7, 11])
def test_nystrom_refit_is_the_least_squares_optimum(keep):
    gen = torch.Generator().manual_seed(keep)
    t, n, d_h = 300, 12, 5
    a = _activations(t, n, gen)
    down = torch.randn(d_h, n, generator=gen)
    res = nystrom_mlp(a.T @ a / t, down, keep, ridge=1e-2)
    assert res.index.tolist() == sorted(torch.topk(res.scores, keep).indices.tolist())
    # independent least squares on the raw activations: min_B || a W_D^T - a_S B ||
    target = a @ down.T
    b_ls = torch.linalg.lstsq(a[:, res.index], target).solution
    torch.testing.assert_close(res.down.T, b_ls, rtol=1e-6, atol=1e-8)
    # and no other selection of the same size with its own refit is better than the refit of ours
    err = torch.linalg.norm(target - a[:, res.index] @ res.down.T)
    assert err <= torch.linalg.norm(target - a[:, res.index] @ down[:, res.index].T) + 1e-9


def test_nystrom_keep_all_is_identity():
    gen = torch.Generator().manual_seed(0)
    a = _activations(50, 6, gen)
    down = torch.randn(4, 6, generator=gen)
    res = nystrom_mlp(a.T @ a, down, 6, ridge=1e-2)
    assert torch.equal(res.down, down) and res.index.tolist() == list(range(6))


def test_qk_select_keeps_top_pairs_intact_and_shares_them_across_gqa_group():
    gen = torch.Generator().manual_seed(3)
    heads, kv, d, keep = 4, 2, 10, 6
    q_sq = torch.rand(heads, d, generator=gen) + 0.01
    k_sq = torch.rand(kv, d, generator=gen) + 0.01
    index = qk_select(q_sq, k_sq, keep, rope=True)
    half = d // 2
    for g, kept in enumerate(index):
        pairs = kept[: keep // 2]
        assert kept[keep // 2 :] == [p + half for p in pairs]  # rotate-half layout, pairs whole
        # brute force: score every subset of pairs by the summed CR importance; ours is the best
        def score(p):
            kp = (k_sq[g, p] + k_sq[g, p + half]).sqrt()
            return float(kp * sum((q_sq[h, p] + q_sq[h, p + half]).sqrt() for h in range(2 * g, 2 * g + 2)))
        best = max(itertools.combinations(range(half), keep // 2), key=lambda s: sum(score(p) for p in s))
        assert sorted(best) == pairs


def test_qk_select_without_rope_keeps_top_dims():
    q_sq = torch.tensor([[4.0, 1.0, 9.0, 0.5]])
    k_sq = torch.tensor([[1.0, 16.0, 1.0, 0.1]])
    # scores sqrt(q) * sqrt(k): 2, 4, 3, 0.22
    assert qk_select(q_sq, k_sq, 2, rope=False) == [[1, 2]]
    with pytest.raises(ValueError):
        qk_select(q_sq, k_sq, 3, rope=True)


def test_gather_qk_rows():
    w = torch.arange(8 * 3, dtype=torch.float64).view(8, 3)  # 2 heads of dim 4
    b = torch.arange(8, dtype=torch.float64)
    gw, gb = gather_qk(w, b, [[0, 2], [1, 3]], head_dim=4, heads_per_index=1)
    assert gb.tolist() == [0, 2, 5, 7] and torch.equal(gw, w[[0, 2, 5, 7]])


@pytest.mark.parametrize("heads,kv,keep", [(2, 2, 3), (4, 2, 2), (4, 1, 4)])
def test_svd_vo_is_the_whitened_eckart_young_optimum(heads, kv, keep):
    gen = torch.Generator().manual_seed(heads * 10 + kv + keep)
    d_h, d, t = 12, 5, 400
    x = _activations(t, d_h, gen)
    c = x.T @ x / t
    v_w = torch.randn(kv * d, d_h, generator=gen)
    o_w = torch.randn(d_h, heads * d, generator=gen)
    res = svd_vo(c, v_w, None, o_w, None, heads, kv, keep)
    assert res.v_weight.shape == (kv * keep, d_h) and res.o_weight.shape == (d_h, heads * keep)
    evals, evecs = torch.linalg.eigh(c)
    c_half = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    group = heads // kv
    for g in range(kv):
        hs = range(g * group, (g + 1) * group)
        m = v_w[g * d : (g + 1) * d].T @ torch.cat([o_w[:, h * d : (h + 1) * d].T for h in hs], 1)
        m_hat = res.v_weight[g * keep : (g + 1) * keep].T @ torch.cat(
            [res.o_weight[:, h * keep : (h + 1) * keep].T for h in hs], 1)
        ours = torch.linalg.norm(c_half @ (m - m_hat))
        s = torch.linalg.svdvals(c_half @ m)
        optimum = s[keep:].pow(2).sum().sqrt()  # Eckart-Young: the tail singular values
        torch.testing.assert_close(ours, optimum, rtol=1e-7, atol=1e-9)


def test_svd_vo_folds_value_bias_exactly():
    gen = torch.Generator().manual_seed(7)
    heads, kv, d, d_h, keep = 4, 2, 3, 8, 2
    x = _activations(100, d_h, gen)
    v_w, v_b = torch.randn(kv * d, d_h, generator=gen), torch.randn(kv * d, generator=gen)
    o_w, o_b = torch.randn(d_h, heads * d, generator=gen), torch.randn(d_h, generator=gen)
    res = svd_vo(x.T @ x, v_w, v_b, o_w, o_b, heads, kv, keep)
    assert torch.count_nonzero(res.v_bias) == 0
    # with uniform attention the bias contribution of the output is exactly b_v W_O + b_o
    expand = v_b.view(kv, 1, d).expand(kv, heads // kv, d).reshape(-1)
    torch.testing.assert_close(res.o_bias, o_w @ expand + o_b)


def test_whitened_svd_baseline_is_optimal_for_the_whitened_error():
    from compressor.baselines import whitened_svd

    gen = torch.Generator().manual_seed(5)
    x = _activations(300, 9, gen)
    c = x.T @ x / 300
    w = torch.randn(7, 9, generator=gen)
    a, b = whitened_svd(w, c, 3)
    # brute force: rank-3 optimum of the output error ||X (W - W')^T|| is the truncated SVD of W X^T
    err = torch.linalg.norm(x @ (w - b @ a).T)
    s = torch.linalg.svdvals(w @ x.T)
    torch.testing.assert_close(err, s[3:].pow(2).sum().sqrt(), rtol=1e-5, atol=1e-8)


def test_damped_refit_interpolates_between_least_squares_and_selection():
    gen = torch.Generator().manual_seed(11)
    a = _activations(200, 10, gen)
    c = a.T @ a / 200
    down = torch.randn(4, 10, generator=gen)
    ls = nystrom_mlp(c, down, 5, 1e-2)
    sel = nystrom_mlp(c, down, 5, 1e-2, damping=float("inf"))
    assert torch.equal(sel.down, down[:, sel.index])
    mid = nystrom_mlp(c, down, 5, 1e-2, damping=0.1)
    # the damped solution is the minimiser of its own objective (brute-force normal equations)
    mu = 0.1 * torch.diagonal(c).mean()
    s = mid.index
    obj = lambda b: torch.trace((down.T - torch.eye(10)[:, s] @ b).T @ c @ (down.T - torch.eye(10)[:, s] @ b)) \
        + mu * torch.linalg.norm(b - down.T[s]) ** 2
    assert obj(mid.down.T) <= min(obj(ls.down.T), obj(sel.down.T)) + 1e-9
