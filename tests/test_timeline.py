"""server.engine.timeline: the critical-path shares against a brute-force timeline, and the trace reader."""
import json
import random

import pytest

from server.engine.timeline import Op, critical_path, gpu_ops, short_name, summarise


def _brute(ops):
    """Unit-resolution timeline: busy units (covered by any op) and idle units inside the span."""
    lo = min(o.start for o in ops)
    hi = max(o.start + o.dur for o in ops)
    busy = sum(1 for t in range(int(lo), int(hi)) if any(o.start <= t < o.start + o.dur for o in ops))
    return busy, (hi - lo) - busy


@pytest.mark.parametrize("seed", range(20))
def test_shares_add_up_to_the_busy_and_idle_time(seed):
    rng = random.Random(seed)
    ops = [Op(f"k{i % 3}", float(rng.randrange(0, 200)), float(rng.randrange(0, 30)))
           for i in range(rng.randrange(1, 40))]
    shares = critical_path(ops)
    busy, idle = _brute(ops)
    assert sum(s.advance for s in shares) == pytest.approx(busy)
    assert sum(s.gap for s in shares) == pytest.approx(idle)
    assert all(s.gap >= 0 and 0 <= s.advance <= s.op.dur for s in shares)


def test_overlapped_launches_are_charged_only_for_what_they_add():
    # b starts while a runs (a programmatic dependent launch) and ends 2 us later; c waits 3 us idle
    shares = critical_path([Op("a", 0, 10), Op("b", 6, 6), Op("c", 15, 1), Op("d", 15.5, 0.2)])
    got = {s.op.name: (s.gap, s.advance) for s in shares}
    assert got == {"a": (0, 10), "b": (0, 2), "c": (3, 1), "d": (0, 0)}


def test_reads_a_chrome_trace_and_groups_matmuls_by_grid(tmp_path):
    events = [
        {"ph": "X", "cat": "kernel", "name": "_skinny_kernel", "ts": 0.0, "dur": 8.0, "args": {"grid": [128, 1, 1]}},
        {"ph": "X", "cat": "kernel", "name": "_skinny_kernel", "ts": 8.0, "dur": 4.0, "args": {"grid": [64, 1, 1]}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "ts": 14.0, "dur": 1.0},
        {"ph": "X", "cat": "kernel", "ts": 15.0, "dur": 2.0, "args": {"grid": [1, 1, 1]},
         "name": "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float> >(at::native::ReduceOp<float>)"},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 0.0, "dur": 3.0},  # host side: not a GPU op
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 1.0},
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    ops = gpu_ops(str(path))
    assert [o.name for o in ops] == ["_skinny_kernel", "_skinny_kernel", "Memcpy HtoD (Pinned -> Device)",
                                     "at::native::reduce_kernel"]
    s = summarise(critical_path(ops), steps=1)
    assert s["span_us_per_step"] == pytest.approx(17.0)
    assert s["idle_us_per_step"] == pytest.approx(2.0)
    rows = {r["op"]: r for r in s["ops"]}
    assert rows["_skinny_kernel grid=[128, 1, 1]"]["advance_us"] == pytest.approx(8.0)
    assert rows["Memcpy HtoD (Pinned -> Device)"]["gap_us"] == pytest.approx(2.0)
    assert short_name("Memcpy DtoH (Device -> Pinned)") == "Memcpy DtoH (Device -> Pinned)"


def _step_ops(durations, t0=0.0):
    """One engine step as the trace shows it: token copy to the device, matmuls (a cuBLAS split-K reduce after
    the second), a norm between them, the token copy to the host; no overlap, so each share is its duration."""
    ops, t = [Op("Memcpy HtoD (Pinned -> Device)", t0, 1.0)], t0 + 1.0
    for i, d in enumerate(durations):
        ops.append(Op("_skinny_kernel" if i != 1 else "nvjet_sm90_tst_64x8", t, d))
        t += d
        if i == 1:
            ops.append(Op("cublasLt::splitKreduce_kernel", t, 0.5))
            t += 0.5
        ops.append(Op("_add_rms_norm_kernel", t, 2.0))
        t += 2.0
    ops.append(Op("Memcpy DtoH (Device -> Pinned)", t, 1.0))
    return ops, t + 1.0


def test_projection_efficiency_sums_each_kind_over_the_layers():
    from compressor.families import modegpt_config
    from compressor.schema import all_weights
    from compressor.sources import PRESETS
    from server.engine.timeline import one_step, projection_efficiency

    cfg = modegpt_config(dict(PRESETS["tiny-llama-gqa"]))
    layers = int(cfg["num_hidden_layers"])
    durations = [float(10 + i) for i in range(4 * layers + 1)]
    ops, t = _step_ops(durations)
    more, t = _step_ops(durations, t)
    last, _ = _step_ops(durations, t)
    step = one_step(critical_path(ops + more + last))
    assert step[0].op.name.startswith("Memcpy HtoD") and step[-1].op.name.startswith("Memcpy DtoH")
    got = projection_efficiency(step, cfg, bandwidth=1e9, itemsize=2)
    w = all_weights(cfg)

    def us(names):
        return sum(w[n][0] * w[n][1] for n in names) * 2 / 1e9 * 1e6

    qkv = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(layers) for p in "qkv"]
    assert got["qkv"]["us"] == pytest.approx(sum(durations[4 * i] for i in range(layers)))
    assert got["o"]["us"] == pytest.approx(sum(durations[4 * i + 1] for i in range(layers)) + 0.5)  # + the reduce
    assert got["qkv"]["ideal_us"] == pytest.approx(us(qkv))
    assert got["lm_head"]["us"] == durations[-1] and got["lm_head"]["ideal_us"] == pytest.approx(us(["lm_head.weight"]))
    assert got["down"]["efficiency"] == pytest.approx(got["down"]["ideal_us"] / got["down"]["us"])
    with pytest.raises(ValueError, match="matmul launches"):
        projection_efficiency(step[:-3], cfg)
    with pytest.raises(ValueError, match="whole engine steps"):
        one_step(critical_path(ops[:-1]))


def test_attention_efficiency_counts_each_layers_kv_dims():
    """Attention's share (partition and combine kernels) against the K/V bytes of every layer at its own
    head dims: a checkpoint with smaller dims has proportionally less to read."""
    from server.engine.timeline import attention_efficiency, kv_bytes_per_step

    cfg = {"num_key_value_heads": 4, "layers": [{"qk_dim": 64, "v_dim": 32}, {"qk_dim": 48, "v_dim": 48}]}
    assert kv_bytes_per_step(cfg, batch=3, context=10) == 3 * 10 * 4 * (96 + 96) * 2
    ops = [Op("Memcpy DtoH (Device -> Pinned)", 0.0, 1.0), Op("_attn_partition_kernel", 1.0, 5.0),
           Op("_skinny_kernel", 6.0, 4.0), Op("_attn_combine_kernel", 10.0, 2.0),
           Op("_attn_partition_kernel", 12.0, 5.0)]
    step = critical_path(ops)
    got = attention_efficiency(step, cfg, batch=3, context=10, bandwidth=1e9)
    assert got["us"] == pytest.approx(12.0)
    assert got["ideal_us"] == pytest.approx(3 * 10 * 4 * 192 * 2 / 1e9 * 1e6)
    assert got["efficiency"] == pytest.approx(got["ideal_us"] / 12.0)
