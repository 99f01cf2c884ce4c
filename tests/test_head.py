"""LM head / embedding factorization (``--head-rank-ratio``, compressor/head.py): the closed form against
a brute-force search, the tied (shared) and untied layouts, parameter accounting, exactness at full
rank, the statistic the pipeline feeds it, and the engine against the reference model."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import compressor  # noqa: F401  (registers the architecture)
from compressor.calibration import calibration_ids
from compressor.checkpoint import CheckpointError, read_checkpoint
from compressor.head import EMBED, HEAD, factorize_head, head_rank
from compressor.loading import load_modegpt
from compressor.pipeline import CompressOptions, compress
from compressor.sources import resolve
from server.engine import ops
from server.engine.engine import LLMEngine

torch.set_num_threads(1)  # tiny problems: one thread is much faster on a shared CPU


def _problem(vocab=12, d=6, tokens=200, seed=0):
    """Weights and strongly anisotropic inputs (so whitening matters)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    x = x @ torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    w = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    e = torch.randn(vocab, d, generator=g, dtype=torch.float64)
    return x, x.T @ x / tokens, w, e


def _search(w: torch.Tensor, x: torch.Tensor, rank: int, seed: int, steps: int = 300) -> float:
    """Brute force: minimise ||(W - B A) X^T||_F over B, A by alternating exact least squares from a random
    start (each half-step solves for one factor; the loss never increases)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, w.shape[1], generator=g, dtype=torch.float64)
    m, y = w @ x.T, x.T
    for _ in range(steps):
        z = a @ y
        b = m @ z.T @ torch.linalg.inv(z @ z.T)
        a = torch.linalg.pinv(b) @ m @ torch.linalg.pinv(y)
    return torch.linalg.norm(m - b @ a @ y).item()


def _cfg(vocab, d, tied):
    return {"vocab_size": vocab, "hidden_size": d, "tie_word_embeddings": tied, "linear_ranks": {}}


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_untied_head_is_the_whitened_optimum_and_embedding_the_plain_one(rank):
    x, c, w, e = _problem()
    cfg, state, rep = factorize_head(_cfg(12, 6, False), {EMBED + ".weight": e, HEAD + ".weight": w}, c, rank)
    assert cfg["linear_ranks"] == {HEAD: rank, EMBED: rank} and not cfg["tie_word_embeddings"]
    assert set(state) == {f"{m}.weight_{f}" for m in (HEAD, EMBED) for f in "ab"}
    head = state[HEAD + ".weight_b"] @ state[HEAD + ".weight_a"]
    loss = torch.linalg.norm((w - head) @ x.T).item()
    # closed form (Eckart-Young on W X^T) ...
    optimum = torch.linalg.svdvals(w @ x.T)[rank:].pow(2).sum().sqrt().item()
    assert loss == pytest.approx(optimum, rel=1e-6)
    # ... and an explicit search from random starts never does better
    best = min(_search(w, x, rank, seed) for seed in range(2))
    assert loss <= best * (1 + 1e-6) and best == pytest.approx(optimum, rel=1e-6)  # ridge 1e-6 in whitened_svd
    # whitening matters: the plain truncated SVD of W is worse on the output error
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    plain = torch.linalg.norm((w - (u[:, :rank] * s[:rank]) @ vh[:rank]) @ x.T).item()
    assert plain > loss * 1.05
    assert rep["head_output_error"] == pytest.approx(loss / torch.linalg.norm(w @ x.T).item(), rel=1e-6)
    # the embedding is the plain (Euclidean) rank-r optimum of its rows
    emb = state[EMBED + ".weight_b"] @ state[EMBED + ".weight_a"]
    tail = torch.linalg.svdvals(e)[rank:].pow(2).sum().sqrt().item()
    assert torch.linalg.norm(e - emb).item() == pytest.approx(tail, rel=1e-6)


def test_tied_embedding_shares_one_factorization_or_unties():
    x, c, _, e = _problem(seed=1)
    cfg, state, rep = factorize_head(_cfg(12, 6, True), {EMBED + ".weight": e}, c, 3)
    assert cfg["tie_word_embeddings"] and cfg["linear_ranks"] == {EMBED: 3} and rep["shared"]
    assert set(state) == {EMBED + ".weight_a", EMBED + ".weight_b"}
    shared = state[EMBED + ".weight_b"] @ state[EMBED + ".weight_a"]
    optimum = torch.linalg.svdvals(e @ x.T)[3:].pow(2).sum().sqrt().item()  # the head's (logit) optimum
    assert torch.linalg.norm((e - shared) @ x.T).item() == pytest.approx(optimum, rel=1e-6)
    # untied: the head keeps the whitened optimum, the embedding gets the plain one; two factor pairs
    cfg_u, state_u, rep_u = factorize_head(_cfg(12, 6, True), {EMBED + ".weight": e}, c, 3, untie=True)
    assert not cfg_u["tie_word_embeddings"] and cfg_u["linear_ranks"] == {HEAD: 3, EMBED: 3} and rep_u["untied"]
    torch.testing.assert_close(state_u[HEAD + ".weight_b"] @ state_u[HEAD + ".weight_a"], shared)
    emb = state_u[EMBED + ".weight_b"] @ state_u[EMBED + ".weight_a"]
    assert torch.linalg.norm(e - emb) < torch.linalg.norm(e - shared)
    # whiten=False: plain SVD for the shared factors too
    _, state_p, _ = factorize_head(_cfg(12, 6, True), {EMBED + ".weight": e}, c, 3, whiten=False)
    torch.testing.assert_close(state_p[EMBED + ".weight_b"] @ state_p[EMBED + ".weight_a"], emb)


def test_head_rank_keeps_the_fraction_of_the_full_rank_aligned():
    smollm2 = {"vocab_size": 49152, "hidden_size": 576}
    assert [head_rank(smollm2, f) for f in (0.25, 0.5, 0.75, 1.0)] == [144, 288, 432, 576]
    assert head_rank(smollm2, 0.51, align=8) == 296 and head_rank(smollm2, 0.001) == 8
    assert head_rank({"vocab_size": 5, "hidden_size": 64}, 1.0) == 5
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            head_rank(smollm2, bad)


def test_invalid_head_rank_ratio_is_refused_before_compressing(tmp_path):
    from compressor.cli import main

    with pytest.raises(SystemExit, match="head-rank-ratio"):
        main(["compress", "random:tiny-opt", "--ratio", "0.1", "--head-rank-ratio", "1.5", "--out", str(tmp_path / "a")])
    with pytest.raises(ValueError, match="head rank ratio"):
        compress("random:tiny-opt", tmp_path / "b", CompressOptions(ratio=0.1, head_rank_ratio=-0.5, progress=False))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------- the pipeline


def _compress(tmp_path, preset, ratio, **kw):
    out = tmp_path / f"{preset}-{ratio}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
    opts = CompressOptions(ratio=ratio, calib_samples=8, calib_seqlen=48, progress=False, **kw)
    return out, compress(f"random:{preset}", out, opts)


@pytest.mark.parametrize("preset", ["tiny-opt", "tiny-llama-gqa"])  # tied, untied
def test_full_rank_head_reproduces_the_original_logits(tmp_path, preset):
    out, report = _compress(tmp_path, preset, 0.0, head_rank_ratio=1.0)
    cfg = json.loads((out / "config.json").read_text())
    assert EMBED in cfg["linear_ranks"] and report["lm_head"]["head_output_error"] < 1e-6
    original = resolve(f"random:{preset}").hf_model()
    model = AutoModelForCausalLM.from_pretrained(out)  # after `import compressor`, no trust_remote_code
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (original(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4
    if cfg["tie_word_embeddings"]:  # one set of factors, shared by the head
        assert model.lm_head.weight_a is model.model.embed_tokens.weight_a
        assert model.lm_head.weight_b is model.model.embed_tokens.weight_b
    # generate() with the KV cache, and a save_pretrained round trip (tied factors saved once)
    gen = model.generate(ids[:, :6], attention_mask=torch.ones_like(ids[:, :6]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (3, 10)
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits)


@pytest.mark.parametrize("preset,untie", [("tiny-opt", False), ("tiny-opt", True), ("tiny-llama-gqa", False)])
def test_parameter_count_drops_as_stated(tmp_path, preset, untie):
    out0, base = _compress(tmp_path, preset, 0.3)
    out, rep = _compress(tmp_path, preset, 0.3, head_rank_ratio=0.5, head_untie=untie)
    cfg = json.loads((out / "config.json").read_text())
    v, d, r = cfg["vocab_size"], cfg["hidden_size"], rep["lm_head"]["rank"]
    assert r == d // 2 and cfg["modegpt"]["lm_head"]["rank"] == r
    tied = json.loads((out0 / "config.json").read_text())["tie_word_embeddings"]
    matrices_before = 1 if tied else 2  # embedding (+ head when untied)
    matrices_after = 1 if tied and not untie else 2
    saving = matrices_before * v * d - matrices_after * r * (v + d)
    assert rep["total_params"]["compressed"] == base["total_params"]["compressed"] - saving
    assert rep["block_linear_params"] == base["block_linear_params"]  # the blocks are untouched
    assert rep["whole_model_ratio"] == pytest.approx(1 - rep["total_params"]["compressed"] / rep["total_params"]["original"])
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # what is stored is what is reported
        assert sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) == rep["total_params"]["compressed"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == rep["total_params"]["compressed"]


def test_head_is_calibrated_on_the_original_final_hidden_states(tmp_path):
    """The pipeline's statistic is E[h h^T] of the original model's final normed hidden states."""
    spec, samples, seqlen = "random:tiny-llama-gqa", 8, 48
    out, _ = _compress(tmp_path, "tiny-llama-gqa", 0.3, head_rank_ratio=0.5)
    source = resolve(spec)
    ids = calibration_ids(source.load_tokenizer(), "wikitext2", samples, seqlen, 256, 0)
    hf = source.hf_model()
    with torch.no_grad():
        h = hf.model(ids).last_hidden_state.flatten(0, 1).double()
    c = h.T @ h / h.shape[0]
    w = hf.lm_head.weight.detach()
    cfg = {"vocab_size": w.shape[0], "hidden_size": w.shape[1], "tie_word_embeddings": False}
    _, want, _ = factorize_head(cfg, {EMBED + ".weight": hf.model.embed_tokens.weight.detach(), HEAD + ".weight": w},
                                c, w.shape[1] // 2)
    _, got = read_checkpoint(out)
    for m in (HEAD, EMBED):
        torch.testing.assert_close(got[m + ".weight_b"] @ got[m + ".weight_a"],
                                   want[m + ".weight_b"] @ want[m + ".weight_a"], rtol=1e-4, atol=1e-5)


def test_checkpoint_with_factorized_head_is_verified(tmp_path):
    out, _ = _compress(tmp_path, "tiny-opt", 0.2, head_rank_ratio=0.5)
    config, state = read_checkpoint(out)
    assert EMBED + ".weight" not in state and state[EMBED + ".weight_b"].shape == (256, 32)
    cfg = json.loads((out / "config.json").read_text())
    cfg["linear_ranks"].pop(EMBED)  # a config that no longer says the embedding is factorized
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(out)
    with pytest.raises(CheckpointError, match="do not match"):
        read_checkpoint(out, verify=False)


@pytest.mark.parametrize("preset,untie", [("tiny-opt", False), ("tiny-opt", True), ("tiny-llama-gqa", False)])
@pytest.mark.parametrize("kernels", [False, True])
def test_engine_scores_equal_reference_model(tmp_path, preset, untie, kernels):
    out, _ = _compress(tmp_path, preset, 0.3, head_rank_ratio=0.5, head_untie=untie)
    loaded = load_modegpt(str(out))
    reference = loaded.hf_model()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.log_softmax(reference(ids).logits.float(), -1)
    heads = []
    try:
        engine = LLMEngine(loaded.config, loaded.state_dict, device="cpu", dtype=torch.float32,
                           kv_cache_bytes=1 << 22, cuda_graphs=False, use_kernels=kernels)
        lowrank = ops.OPS["factorized_linear"]
        assert (lowrank is not ops.factorized_linear) == kernels

        def spy(x, a, b, bias):  # the LM head goes through the same op as every factorized linear
            if b.shape[0] == loaded.config["vocab_size"]:
                heads.append(tuple(a.shape))
            return lowrank(x, a, b, bias)

        ops.register_op("factorized_linear", spy)
        got = engine.score(ids.tolist())
    finally:
        ops.reset_ops()
    assert heads and set(heads) == {(loaded.config["hidden_size"] // 2, loaded.config["hidden_size"])}
    for row, logp in enumerate(got):
        torch.testing.assert_close(logp, expected[row], rtol=1e-4, atol=1e-4)
