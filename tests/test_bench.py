"""The benchmark commands run end to end on tiny presets and write their results files."""
import json

import pytest

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


def test_bench_ab_alternates_rounds_and_reports_the_median_ratio(tmp_path, monkeypatch):
    from server.engine.bench_ab import main as bench_ab

    out = tmp_path / "ab.json"
    monkeypatch.delenv("MODEGPT_KERNELS", raising=False)
    variants = ["random:tiny-llama-gqa", "random:tiny-llama-gqa@MODEGPT_KERNELS=torch,MODEGPT_PDL=0"]
    res = bench_ab([*variants, "--dtype", "float32", "--batch", "2", "3",
                    "--prompt-len", "5", "--steps", "3", "--rounds", "3", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert saved["variants"] == variants and [r["batch"] for r in saved["runs"]] == [2, 3]
    for run in saved["runs"]:
        assert [len(run["ms_per_step"][v]) for v in variants] == [3, 3]
        assert all(x > 0 for v in variants for x in run["ms_per_step"][v])
        assert run["speedup_over_first"][variants[0]] == 1.0 and run["speedup_over_first"][variants[1]] > 0
    import os
    assert "MODEGPT_KERNELS" not in os.environ  # each variant's environment is restored after its rounds


def test_bench_ab_variants_of_a_host_setting_share_one_engine(capsys):
    from server.engine.bench_ab import main as bench_ab

    variants = ["random:tiny-llama-gqa@MODEGPT_ASYNC_SCHEDULING=0", "random:tiny-llama-gqa@MODEGPT_ASYNC_SCHEDULING=1"]
    res = bench_ab([*variants, "--dtype", "float32", "--batch", "2", "--prompt-len", "5", "--steps", "3",
                    "--rounds", "2"])
    assert capsys.readouterr().out.count("built ") == 1  # one engine, the setting switched per round
    assert res["async_scheduling"] == {variants[0]: False, variants[1]: True}
    assert all(len(v) == 2 and min(v) > 0 for v in res["runs"][0]["ms_per_step"].values())


def test_bench_ab_rejects_a_malformed_variant():
    from server.engine.bench_ab import parse_variant

    assert parse_variant("ckpt@A=1,B=x=y") == ("ckpt", {"A": "1", "B": "x=y"})
    with pytest.raises(SystemExit, match="SPEC@KEY=VAL"):
        parse_variant("ckpt@NOEQUALS")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_bench_kernels_is_a_subcommand_that_refuses_without_a_gpu(tmp_path, capsys):
    """`modegpt bench kernels` times on CUDA only: without a GPU it exits 2 with a message that says where the
    kernels' correctness is tested instead, and writes no results file."""
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--only", "skinny", "--json", str(out)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err and not out.exists()
