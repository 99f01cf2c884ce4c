"""The benchmark commands run end to end on tiny presets and write their results files."""
import json

from compressor.cli import main


def test_bench_compress_writes_results(tmp_path):
    out = tmp_path / "compress.json"
    assert main(["bench", "compress", "random:tiny-opt", "--ratio", "0.3", "--workdir", str(tmp_path / "w"),
                 "--json", str(out), "--calib-samples", "4", "--calib-seqlen", "32", "--quiet"]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["model"] == "random:tiny-opt" and row["wall_s"] > 0
    assert abs(row["block_linear_ratio"] - 0.3) < 0.01 and row["calibration"] == "4 x 32"


def test_bench_engine_compares_original_and_compressed(tmp_path):
    ckpt = tmp_path / "ck"
    assert main(["compress", "random:tiny-llama-gqa", "--ratio", "0.4", "--out", str(ckpt), "--calib-samples", "4",
                 "--calib-seqlen", "32", "--quiet"]) == 0
    out = tmp_path / "engine.json"
    assert main(["bench", "engine", "random:tiny-llama-gqa", str(ckpt), "--batch", "1", "3", "--prompt-len", "8",
                 "--gen-len", "4", "--kv-cache-gb", "0.01", "--device", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [
        ("random:tiny-llama-gqa", 1), ("random:tiny-llama-gqa", 3), (str(ckpt), 1), (str(ckpt), 3)]
    # the prefill step samples the first token; the other gen_len - 1 come from decode steps
    assert all(r["decode_tok_s"] > 0 and r["decode_steps"] == 3 and 0 < r["fraction_of_roofline"] for r in rows)
    assert rows[0]["speedup"] == 1.0
    original, compressed = result["models"]
    # the compressed model's KV cache is smaller per token, so more sequences fit in the same budget
    assert compressed["kv_bytes_per_token"] < original["kv_bytes_per_token"]
    assert compressed["sequences_in_budget"] >= original["sequences_in_budget"]


def test_bench_ab_alternates_rounds_and_reports_the_median_ratio(tmp_path):
    from server.engine.bench_ab import main as bench_ab

    out = tmp_path / "ab.json"
    res = bench_ab(["random:tiny-llama-gqa", "random:tiny-llama-gqa", "--dtype", "float32", "--batch", "2",
                    "--prompt-len", "5", "--steps", "3", "--rounds", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["speedup_b_over_a"] == res["speedup_b_over_a"] > 0
    assert saved["models"] == {"a": "random:tiny-llama-gqa", "b": "random:tiny-llama-gqa"}
    assert [len(saved["ms_per_step"][r]) for r in "ab"] == [3, 3]
    assert all(x > 0 for r in "ab" for x in saved["ms_per_step"][r])
