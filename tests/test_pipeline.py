"""End to end on the tiny presets: identity at ratio 0, exact parameter ratio, loadable checkpoints."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import compressor  # noqa: F401  (registers the architecture)
from compressor.checkpoint import CheckpointError, read_checkpoint
from compressor.families import family_for
from compressor.loading import load_modegpt
from compressor.pipeline import CompressOptions, compress
from compressor.sources import resolve

PRESETS = ["tiny-llama-gqa", "tiny-qwen2", "tiny-opt"]


def _compress(tmp_path, preset, ratio, **kw):
    out = tmp_path / f"{preset}-{ratio}"
    opts = CompressOptions(ratio=ratio, calib_samples=8, calib_seqlen=48, progress=False, **kw)
    return out, compress(f"random:{preset}", out, opts)


@pytest.mark.parametrize("preset", PRESETS)
def test_ratio_zero_is_the_identity(tmp_path, preset):
    out, report = _compress(tmp_path, preset, 0.0)
    assert report["block_linear_ratio"] == 0.0
    original = resolve(f"random:{preset}").hf_model()
    model = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (original(ids).logits - model(ids).logits).abs().max().item()
    assert diff < 1e-4


@pytest.mark.parametrize("preset", PRESETS)
def test_compressed_checkpoint_loads_generates_and_holds_ratio(tmp_path, preset):
    out, report = _compress(tmp_path, preset, 0.3)
    assert report["block_linear_ratio"] == pytest.approx(0.3, abs=0.01)
    assert 0 < report["whole_model_ratio"] < report["block_linear_ratio"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["ModeGPTForCausalLM"] and cfg["modegpt"]["ratio"] == 0.3
    assert all(len(layer["qk_index"]) == cfg["num_key_value_heads"] for layer in cfg["layers"])
    assert any(layer["qk_dim"] < cfg["head_dim"] for layer in cfg["layers"])
    rep = json.loads((out / "compression_report.json").read_text())
    assert len(rep["layers"]) == cfg["num_hidden_layers"] and "compress_s" in rep["timings"]
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 256, (2, 6))
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert gen.shape == (2, 11)
    # incremental decoding with the cache equals a full forward
    with torch.no_grad():
        full = model(gen).logits[:, -1]
        step = model(gen[:, :-1], use_cache=True)
        cache = getattr(step, "cache", None) or step.past_key_values
        last = model(gen[:, -1:], past_key_values=cache, use_cache=True).logits[:, -1]
    torch.testing.assert_close(full, last, rtol=1e-4, atol=1e-4)


def test_compression_beats_plain_truncation(tmp_path):
    """The refit/SVD must do better than keeping the same sizes without them (output error)."""
    out, _ = _compress(tmp_path, "tiny-llama-gqa", 0.3)
    original = resolve("random:tiny-llama-gqa").hf_model()
    model = load_modegpt(str(out)).hf_model()
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        p = torch.log_softmax(original(ids).logits, -1)
        q = torch.log_softmax(model(ids).logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert 0 < kl < 1.0


def test_tampered_or_partial_checkpoint_is_refused(tmp_path):
    out, _ = _compress(tmp_path, "tiny-opt", 0.2)
    read_checkpoint(out)
    data = bytearray((out / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        read_checkpoint(out)
    (out / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        read_checkpoint(out)


def test_existing_output_is_not_overwritten(tmp_path):
    out, _ = _compress(tmp_path, "tiny-opt", 0.1)
    with pytest.raises(FileExistsError):
        compress("random:tiny-opt", out, CompressOptions(ratio=0.1, calib_samples=2, calib_seqlen=16, progress=False))


def test_unsupported_architecture_names_supported_ones():
    with pytest.raises(ValueError, match="llama.*mistral.*opt.*qwen2"):
        family_for("gpt2")
