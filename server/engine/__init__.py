"""The in-process inference engine: model runner, KV cache, scheduler and sampler.

Modules, one job each:
- `types`: the contract with the API layer (requests, sampling params, token events, stats);
- `ops`: per-op PyTorch math behind a swappable table (Triton kernels plug in via `ops.use_kernels`);
- `model`: the ModeGPT architecture (docs/CHECKPOINT.md) over a flat token batch + paged KV cache;
- `kv_cache`: paged KV cache sized from a byte budget, block allocator, usage;
- `sampler`: per-request penalties / bias / min_tokens / temperature / top-k / top-p / seeds / logprobs;
- `scheduler`: continuous batching with chunked prefill, preemption by recompute, abort;
- `runner`: scheduler output -> tensors -> logits, CUDA graphs for decode, teacher-forced scoring;
- `engine`: `LLMEngine`, the synchronous step loop (tests, offline);
- `async_engine`: `AsyncEngine`, the step loop in a background thread for the asyncio server;
- `detokenize`: incremental detokenization for streaming, token bytes / texts for logprobs;
- `testing`: tiny random checkpoints and a byte-level tokenizer for tests; `bench`: a throughput check.
"""
