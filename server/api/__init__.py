"""The OpenAI-compatible HTTP API (vLLM's ``/v1/completions`` surface) over several ``AsyncEngine``s.

- ``protocol``: request/response models and cross-field validation;
- ``errors``: the OpenAI error shape and the exception handlers (bad input is never a 5xx);
- ``registry``: public model id -> engine (the one object canary routing will replace);
- ``completions`` + ``choice`` + ``logprobs``: engine requests, detokenization, stops, logprobs, SSE;
- ``metrics``: Prometheus metrics under vLLM's names, one registry per app;
- ``app``: ``build_app(registry)``; ``testing``: real parts for tests (uvicorn thread, scripted model).
"""
