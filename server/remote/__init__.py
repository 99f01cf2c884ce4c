"""Remote variants: the original or the compressed model served by another OpenAI-compatible server
(``vllm serve``, another ``modegpt serve``) instead of an in-process engine.

- ``backend``: one backend (base URL, model id, pooled ``httpx.AsyncClient``, timeouts, bounded
  retries before the first byte, discovery through ``GET /v1/models``, the health probe);
- ``health``: consecutive-failure ejection and re-admission, and the thread that probes;
- ``forward``: a routed request forwarded (``model`` rewritten) and its answer or SSE events relayed
  under our completion id and the variant's public id;
- ``scoring``: divergence of a remote pair from echo scoring with top-k logprobs;
- ``metrics``: the ``modegpt_backend_*`` series.

``server.api.registry.ServedModel.remote`` is the one seam: a served model with a ``remote`` backend
is forwarded by ``server.api.completions.CompletionService``; everything else (canary routing, shadow,
rollout, review, metrics) is shared with in-process models.
"""
