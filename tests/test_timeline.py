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
    ops = [Op(f"k{i % 3}", float(rng.randrange(0, 200)), float(rng.randrange(0, 30))) for i in range(rng.randrange(1, 40))]
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
