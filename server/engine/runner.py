"""The model runner: turns a `SchedulerOutput` into tensors, runs the model, returns logits rows.

Design decisions:
- One flat batch per step: decode tokens first, then prefill chunks (see `model.AttentionMetadata`).
  Logits are computed only for rows that are sampled or scored for prompt logprobs.
- CUDA graphs (CUDA only; `cuda_graphs=True` and env `MODEGPT_CUDA_GRAPHS` not "0"): the decode-only
  step is captured once per batch-size bucket (1, 2, 4, ..., up to `max_num_seqs`) over static input
  buffers; a batch is padded to its bucket with rows that read and write only the scratch block 0.
  The decode attention gathers a fixed width of `graph_max_blocks` blocks per row, capped by
  `cuda_graph_max_len` (default 4096 tokens) to bound the gather's memory; steps whose longest context
  is beyond it, and every step with a prefill in it, run eagerly. All buckets share one memory pool.
- Each bucket is captured once per context class (`graph_context_lens`, default 256 and 1024 tokens,
  plus `cuda_graph_max_len`; env `MODEGPT_GRAPH_CONTEXTS=256,1024`, `0` for one class): the block
  tables of a class are that wide, and the decode attention kernel plans its split of the context and
  its key tile from that width (`kernels.decode_attention.auto_config`). A step replays the narrowest
  class that holds its longest context. Measured on the H200 (docs/BENCHMARKS.md, session 7): at
  64-256 sequences of ~100 tokens, key tiles of 32 made a 7B step 1.04-1.16x faster than the 64 that
  a 4096-wide table gets; and the host fills and copies a 16-wide table instead of a 256-wide one.
  The cost: capture time and each graph's output logits (`[bucket, vocab]` float32) per class, e.g.
  ~65 MB per class for buckets up to 256 at a 32k vocabulary; activations share the one pool.
- `torch.compile` only behind `compile=True` (applied to the decode forward, the hot path). On CPU it is
  4.7x slower than eager (every step's attention metadata recompiles; docs/BENCHMARKS.md).
- Triton kernels (`kernels` package: fused RoPE + K/V cache write, paged decode attention, low-rank
  linears) are used on CUDA by default (`use_kernels=None`); `use_kernels=False` or env
  `MODEGPT_KERNELS=torch` keeps the PyTorch ops, `True` forces them on. The op table is process-wide
  (`ops.use_kernels`): the last engine built sets it, and `kernels.dispatch` still sends CPU tensors to
  PyTorch.
- On CPU it is the same code without graphs.
- `score()` runs teacher-forced full-sequence forwards without touching the KV cache.
- `execute(out, input_ids=...)`: the decode step whose input tokens are still on the device (the
  previous step's samples, `LLMEngine`'s async scheduling). The host fills everything else; the ids
  are copied on the device, behind the step that produces them.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from server.engine import ops
from server.engine.kv_cache import PagedKVCache
from server.engine.model import AttentionMetadata, ModeGPTModel
from server.engine.scheduler import ScheduledChunk, SchedulerOutput
from server.engine.transfer import to_device

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
GRAPH_CONTEXT_LENS = (256, 1024)
_GRAPH_CONTEXTS_ENV = "MODEGPT_GRAPH_CONTEXTS"


def resolve_graph_context_lens(lens: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The context classes (tokens) below `cuda_graph_max_len` that get their own decode graphs: `lens`,
    else env `MODEGPT_GRAPH_CONTEXTS` (comma-separated; `0` or empty: none), else `GRAPH_CONTEXT_LENS`."""
    if lens is not None:
        return tuple(int(x) for x in lens)
    raw = os.environ.get(_GRAPH_CONTEXTS_ENV)
    if raw is None:
        return GRAPH_CONTEXT_LENS
    try:
        vals = tuple(int(x) for x in raw.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"{_GRAPH_CONTEXTS_ENV} must be comma-separated token counts (or 0), got {raw!r}") from None
    if any(v < 0 for v in vals):
        raise ValueError(f"{_GRAPH_CONTEXTS_ENV} must not be negative, got {raw!r}")
    return tuple(v for v in vals if v > 0)


def graph_widths(context_lens: tuple[int, ...], block_size: int, max_blocks: int) -> list[int]:
    """Block-table widths of the decode graphs: one per context class, capped at `max_blocks`, which is
    always one of them."""
    return sorted({min(max_blocks, math.ceil(n / block_size)) for n in context_lens if n > 0} | {max_blocks})


def cuda_graphs_enabled(flag: bool, device: torch.device) -> bool:
    return bool(flag) and device.type == "cuda" and os.environ.get("MODEGPT_CUDA_GRAPHS", "1") != "0"


def kernels_wanted(flag: bool | None, device: torch.device) -> bool:
    """`flag`, or by default: on CUDA unless `MODEGPT_KERNELS=torch` (or legacy `MODEGPT_ENGINE_KERNELS=0`)."""
    if flag is not None:
        return bool(flag)
    if os.environ.get("MODEGPT_ENGINE_KERNELS") in ("0", "1"):
        return os.environ["MODEGPT_ENGINE_KERNELS"] == "1"
    return device.type == "cuda" and os.environ.get("MODEGPT_KERNELS", "auto").strip().lower() != "torch"


@dataclass
class StepResult:
    logits: Tensor  # [R, V] float32
    sample_rows: list[tuple[ScheduledChunk, int]] = field(default_factory=list)  # chunk, row in logits
    prompt_rows: list[tuple[ScheduledChunk, int, int]] = field(default_factory=list)  # chunk, first row, count
    used_graph: bool = False


class ModelRunner:
    def __init__(self, config: dict, state_dict: dict[str, Tensor], *, device="cpu", dtype=torch.float32,
                 kv_cache_bytes: int, block_size: int = 16, max_num_seqs: int = 256, max_model_len: int = 2048,
                 kv_cache_dtype: torch.dtype | None = None, cuda_graphs: bool = True, compile: bool = False,
                 cuda_graph_max_len: int = 4096, max_num_batched_tokens: int = 2048,
                 use_kernels: bool | None = None, graph_context_lens: tuple[int, ...] | None = None):
        self.device = torch.device(device)
        self.kernels = kernels_wanted(use_kernels, self.device) and ops.use_kernels()
        if use_kernels is False:
            ops.reset_ops()
        self.dtype = dtype
        self.model = ModeGPTModel(config, state_dict, device=self.device, dtype=dtype)
        self.kv = PagedKVCache(self.model.kv_shapes(), kv_cache_bytes, block_size, self.device,
                               kv_cache_dtype or dtype)
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs
        # the decode attention kernel's split-combine counters (AttentionMetadata.attn_counters): one
        # buffer per model, because two models of one process may run at once
        self.attn_counters = torch.zeros(max_num_seqs * int(config["num_key_value_heads"]), dtype=torch.int32,
                                         device=self.device) if self.kernels else None
        self.max_model_len = max_model_len
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_blocks_per_seq = math.ceil(max_model_len / block_size)
        self._decode_fn = self.model.forward
        if compile:
            self._decode_fn = torch.compile(self.model.logits, dynamic=False)  # called in inference mode
        self.use_graphs = cuda_graphs_enabled(cuda_graphs, self.device)
        self.graph_max_blocks = min(self.max_blocks_per_seq, math.ceil(cuda_graph_max_len / block_size))
        self.graph_widths = graph_widths(resolve_graph_context_lens(graph_context_lens), block_size,
                                         self.graph_max_blocks)
        # batch bucket -> block-table width -> (graph, its logits)
        self.graphs: dict[int, dict[int, tuple[torch.cuda.CUDAGraph, Tensor]]] = {}
        self.num_graph_steps = 0
        self.num_eager_steps = 0
        if self.use_graphs:
            self.capture_graphs()

    @property
    def caches(self):
        return self.kv.caches

    # ------------------------------------------------------------------------------ inputs

    def prepare(self, out: SchedulerOutput, ids_pending: bool = False):
        """The step's flat inputs: `(ids, positions, slots, decode block tables, decode context lengths,
        metadata, logits rows, StepResult with its sample/prompt rows)`. `ids_pending`: a decode step
        whose input tokens the host does not have yet (ids are placeholders)."""
        if ids_pending or (not out.prefills and all(c.samples for c in out.decodes)):
            return self._prepare_decode(out, ids_pending)
        return self._prepare_general(out)

    def _prepare_general(self, out: SchedulerOutput):
        bs = self.block_size
        alloc = self.kv.allocator
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        logits_idx: list[int] = []
        res = StepResult(logits=None)  # type: ignore[arg-type]
        t = 0
        for c in out.chunks:
            seq = c.seq
            table = alloc.table(seq.request_id)
            ids.extend(seq.token_ids[c.start:c.end])
            pos.extend(range(c.start, c.end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(c.start, c.end))
            pl = c.prompt_logprob_positions
            if len(pl):
                res.prompt_rows.append((c, len(logits_idx), len(pl)))
                logits_idx.extend(t + p - c.start for p in pl)
            if c.samples:
                res.sample_rows.append((c, len(logits_idx)))
                logits_idx.append(t + c.num_tokens - 1)
            t += c.num_tokens
        nd = len(out.decodes)
        dec_tables = [alloc.table(c.seq.request_id) for c in out.decodes]
        dec_ctx = [c.end for c in out.decodes]
        meta = AttentionMetadata(num_decode=nd, block_size=bs, attn_counters=self.attn_counters)
        meta.prefill_query_lens = [c.num_tokens for c in out.prefills]
        meta.prefill_context_lens = [c.end for c in out.prefills]
        meta.prefill_block_tables = [
            torch.tensor(alloc.table(c.seq.request_id), dtype=torch.long, device=self.device) if c.start > 0
            else None for c in out.prefills]
        return ids, pos, slots, dec_tables, dec_ctx, meta, logits_idx, res

    def _prepare_decode(self, out: SchedulerOutput, ids_pending: bool = False):
        """`prepare` for the common decode-only step in which every sequence samples: the same result,
        built in a few list comprehensions (at 256 sequences the general loop is a measurable part of a
        step's host time: `server.engine.profile_step`'s `prepare_ms`)."""
        bs = self.block_size
        decodes = out.decodes
        tables = self.kv.allocator.tables
        dec_tables = [tables[c.seq.request_id] for c in decodes]
        pos = [c.start for c in decodes]
        ids = [0] * len(decodes) if ids_pending else [c.seq.token_ids[p] for c, p in zip(decodes, pos)]
        slots = [t[p // bs] * bs + p % bs for t, p in zip(dec_tables, pos)]
        dec_ctx = [p + 1 for p in pos]
        n = len(decodes)
        res = StepResult(logits=None, sample_rows=list(zip(decodes, range(n))))  # type: ignore[arg-type]
        meta = AttentionMetadata(num_decode=n, block_size=bs, attn_counters=self.attn_counters)
        return ids, pos, slots, dec_tables, dec_ctx, meta, list(range(n)), res

    @staticmethod
    def _pad_tables(tables: list[list[int]], width: int) -> list[list[int]]:
        return [t + [0] * (width - len(t)) for t in tables]

    # ------------------------------------------------------------------------------ execution

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, input_ids: Tensor | None = None) -> StepResult:
        """Run one step. `input_ids [num decodes]` (long, on the device): a decode-only step's input
        tokens, which then need not be on the host."""
        if input_ids is not None and (out.prefills or len(input_ids) != len(out.decodes)):
            raise ValueError("input_ids is for a decode-only step, one id per decode")
        ids, pos, slots, dec_tables, dec_ctx, meta, logits_idx, res = self.prepare(out, input_ids is not None)
        dev = self.device
        nd = meta.num_decode
        decode_only = nd > 0 and not out.prefills
        max_blocks = max((len(t) for t in dec_tables), default=0)
        if (decode_only and self.use_graphs and nd <= max(self.graphs, default=0)
                and max_blocks <= self.graph_max_blocks and logits_idx == list(range(nd))):
            res.logits = self._run_graph(ids, pos, slots, dec_tables, dec_ctx, input_ids)
            res.used_graph = True
            self.num_graph_steps += 1
            return res
        self.num_eager_steps += 1
        meta.slot_mapping = to_device(slots, torch.long, dev)
        if nd:
            meta.decode_block_tables = to_device(self._pad_tables(dec_tables, max_blocks), torch.long, dev)
            meta.decode_context_lens = to_device(dec_ctx, torch.long, dev)
        fn = self._decode_fn if decode_only else self.model.forward
        ids_t = input_ids if input_ids is not None else to_device(ids, torch.long, dev)
        res.logits = fn(ids_t, to_device(pos, torch.long, dev), self.caches, meta, to_device(logits_idx, torch.long, dev))
        return res

    # ------------------------------------------------------------------------------ cuda graphs

    def graph_buckets(self) -> list[int]:
        b = [x for x in GRAPH_BUCKETS if x < self.max_num_seqs] + [self.max_num_seqs]
        return sorted(set(b))

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        dev = self.device
        buckets = self.graph_buckets()
        mb = buckets[-1]
        # inputs: one [4, mb] block (ids, positions, slots, context lengths) and the block tables, each
        # refilled per step by ONE async copy from a pinned host twin (padding: token 0 at slot 0, the
        # scratch block, with context length 1)
        self.g_vec = torch.zeros(4, mb, dtype=torch.long, device=dev)
        self.g_vec[3] = 1
        self.g_ids, self.g_pos, self.g_slots, self.g_ctx = self.g_vec.unbind(0)
        self.g_tables = {w: torch.zeros(mb, w, dtype=torch.long, device=dev) for w in self.graph_widths}
        self.h_vec = torch.zeros(4, mb, dtype=torch.long, pin_memory=True)
        self.h_tables = {w: torch.zeros(mb, w, dtype=torch.long, pin_memory=True) for w in self.graph_widths}
        self.h_copied = torch.cuda.Event()  # the host twins may be rewritten once their copies are done
        self.h_copied.record()
        pool = None
        for w in reversed(self.graph_widths):
            for b in reversed(buckets):
                meta = AttentionMetadata(num_decode=b, slot_mapping=self.g_slots[:b],
                                         decode_block_tables=self.g_tables[w][:b], decode_context_lens=self.g_ctx[:b],
                                         block_size=self.block_size, attn_counters=self.attn_counters)
                # warm up on a side stream (lazy inits, autotuning) before capture
                s = torch.cuda.Stream(device=dev)
                s.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(s):
                    self._decode_fn(self.g_ids[:b], self.g_pos[:b], self.caches, meta)
                torch.cuda.current_stream(dev).wait_stream(s)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool):
                    logits = self._decode_fn(self.g_ids[:b], self.g_pos[:b], self.caches, meta)
                if pool is None:
                    pool = g.pool()
                self.graphs.setdefault(b, {})[w] = (g, logits)
        torch.cuda.synchronize(dev)

    def graph_for(self, num_seqs: int, max_blocks: int) -> tuple[int, int]:
        """(batch bucket, table width) of the graph a decode step of `num_seqs` sequences whose longest
        context spans `max_blocks` blocks replays: the smallest of each that holds it."""
        return (min(x for x in self.graphs if x >= num_seqs), min(w for w in self.graph_widths if w >= max_blocks))

    def _run_graph(self, ids, pos, slots, tables, ctx, input_ids: Tensor | None = None) -> Tensor:
        n = len(ids)
        b, w = self.graph_for(n, max((len(t) for t in tables), default=0))
        self.h_copied.synchronize()  # free in practice: the previous step synced on its sampled tokens
        hv, ht = self.h_vec.numpy(), self.h_tables[w].numpy()
        hv[0, :n], hv[1, :n], hv[2, :n], hv[3, :n] = ids, pos, slots, ctx
        hv[:3, n:b], hv[3, n:b] = 0, 1
        ht[:b] = 0
        for i, t in enumerate(tables):
            ht[i, :len(t)] = t
        self.g_vec.copy_(self.h_vec, non_blocking=True)
        self.g_tables[w][:b].copy_(self.h_tables[w][:b], non_blocking=True)
        self.h_copied.record()
        if input_ids is not None:  # behind the step that samples them (one stream)
            self.g_ids[:n].copy_(input_ids)
        g, logits = self.graphs[b][w]
        g.replay()
        return logits[:n].clone()

    # ------------------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def score(self, token_ids: list[list[int]], max_tokens_per_batch: int | None = None) -> list[Tensor]:
        """Teacher-forced full-vocabulary log-probs: for each sequence a float32 CPU tensor `[L, V]` whose
        row i is `log p(. | tokens[:i+1])`. Sequences are packed into forwards of at most
        `max_tokens_per_batch` tokens (a longer sequence goes alone). The KV cache is not used."""
        limit = max_tokens_per_batch or self.max_num_batched_tokens
        for s in token_ids:
            if not s:
                raise ValueError("cannot score an empty sequence")
            if len(s) > self.max_model_len:
                raise ValueError(f"sequence of {len(s)} tokens exceeds max_model_len {self.max_model_len}")
        results: list[Tensor | None] = [None] * len(token_ids)
        order = list(range(len(token_ids)))
        i = 0
        while i < len(order):
            group = [order[i]]
            total = len(token_ids[order[i]])
            i += 1
            while i < len(order) and total + len(token_ids[order[i]]) <= limit:
                group.append(order[i])
                total += len(token_ids[order[i]])
                i += 1
            lens = [len(token_ids[j]) for j in group]
            ids = torch.tensor([t for j in group for t in token_ids[j]], dtype=torch.long, device=self.device)
            pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
            logits = self.model(ids, pos, None, AttentionMetadata.no_cache(lens))
            lp = torch.log_softmax(logits, dim=-1).cpu()
            for j, part in zip(group, lp.split(lens)):
                results[j] = part
        return results  # type: ignore[return-value]
