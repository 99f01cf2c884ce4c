"""The in-process inference engine: model runner, KV cache, scheduler and sampler."""
