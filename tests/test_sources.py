"""MODEL specs: sharded HF directories, the bundled GGUF, presets, and the CLI's errors."""
import json

import pytest
import torch

from compressor.cli import main
from compressor.loading import load_modegpt
from compressor.pipeline import CompressOptions, compress
from compressor.sources import resolve


def test_sharded_hf_directory_streams_and_compresses(tmp_path):
    original = resolve("random:tiny-llama-gqa").hf_model()
    src = tmp_path / "hf"
    original.save_pretrained(src, max_shard_size="40KB")
    assert len(list(src.glob("*.safetensors"))) > 3
    out = tmp_path / "ckpt"
    compress(str(src), out, CompressOptions(ratio=0.0, calib_samples=2, calib_seqlen=16, progress=False))
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        diff = (original(ids).logits - load_modegpt(str(out)).hf_model()(ids).logits).abs().max()
    assert diff < 1e-4


def test_smollm2_alias_is_the_bundled_gguf_converted_once():
    source = resolve("smollm2-135m")
    cfg = source.hf_config
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (30, 9, 3)
    assert cfg["tie_word_embeddings"] and (source.tokenizer_dir / "tokenizer.json").is_file()
    # the ModeGPT conversion of the real model equals transformers' LlamaForCausalLM
    hf = source.hf_model()
    tok = source.load_tokenizer()
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (hf(ids).logits - load_modegpt("smollm2-135m").hf_model()(ids).logits).abs().max()
    assert diff < 1e-4


def test_unknown_specs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="presets: .*llama-2-13b"):
        resolve("random:gpt-5")
    with pytest.raises(FileNotFoundError, match="cannot resolve MODEL"):
        resolve(str(tmp_path / "nope"))
    bad = tmp_path / "gpt2"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="supported model types"):
        resolve(str(bad))


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit, match="--ratio must be in"):
        main(["compress", "random:tiny-opt", "--ratio", "1.5", "--out", str(tmp_path / "x")])
    assert main(["compress", str(tmp_path / "missing"), "--ratio", "0.2", "--out", str(tmp_path / "y")]) == 2
    assert "cannot resolve MODEL" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_cli_compress_and_eval_roundtrip(tmp_path, capsys):
    out = tmp_path / "ck"
    assert main(["compress", "random:tiny-qwen2", "--ratio", "0.25", "--out", str(out), "--calib-samples", "4",
                 "--calib-seqlen", "32", "--quiet"]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["modegpt"]["ratio"] == 0.25
