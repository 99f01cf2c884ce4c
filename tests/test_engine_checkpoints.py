"""The engine serves real compressed checkpoints exactly like the reference HF model class.

Data flows compressor -> checkpoint -> engine: this checks the two implementations of the format
agree on checkpoints the compressor actually writes (biases folded, factorized linears, OPT positions).
"""
import pytest
import torch

from compressor.baselines import compress_baseline
from compressor.loading import load_modegpt
from compressor.pipeline import CompressOptions, compress
from server.engine.engine import LLMEngine


@pytest.mark.parametrize("preset,method", [("tiny-llama-gqa", "modegpt"), ("tiny-qwen2", "modegpt"),
                                           ("tiny-opt", "modegpt"), ("tiny-llama-gqa", "svd")])
def test_engine_scores_equal_reference_model(tmp_path, preset, method):
    opts = CompressOptions(ratio=0.3, calib_samples=4, calib_seqlen=32, progress=False)
    out = tmp_path / "ck"
    if method == "svd":
        compress_baseline("svd", f"random:{preset}", out, opts)
    else:
        compress(f"random:{preset}", out, opts)
    loaded = load_modegpt(str(out))
    reference = loaded.hf_model()
    engine = LLMEngine(loaded.config, loaded.state_dict, device="cpu", dtype=torch.float32, kv_cache_bytes=1 << 22,
                       cuda_graphs=False)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch.log_softmax(reference(ids).logits.float(), -1)
    got = engine.score(ids.tolist())
    for row, logp in enumerate(got):
        torch.testing.assert_close(logp, expected[row], rtol=1e-4, atol=1e-4)
