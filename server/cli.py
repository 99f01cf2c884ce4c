"""``modegpt serve``: the original and the compressed model side by side behind one OpenAI-compatible API.

The socket is bound and uvicorn serves at once (``/health`` answers 503); the models load in a
background thread and the registry is marked ready when every engine is up. Public model ids: the
original's id, the compressed model's id, and ``--name``: with both models, a canary routes it between
the two (``server/canary``: weight, sticky users, critical keys, pinning, shadow comparisons, staged
rollout, admin API under ``/admin/canary``); with one model it is an alias of it.

Canary settings: defaults < ``--canary-config FILE`` (YAML, see ``server/canary/config.py``) < flags.
With no model arguments (the embedded default) the canary is on at weight 0.1 with shadow fraction 0.2;
with explicit models and no canary flags or file it routes everything unpinned to the original
(weight 0, no comparisons) until the admin API or a flag says otherwise.

Remote variants: ``--original`` and/or ``--compressed`` may be an OpenAI-compatible base URL
(``http://host:8001/v1``, a ``vllm serve`` or another ``modegpt serve``; ``URL#MODEL_ID`` names the
backend's model, else it is read from ``/v1/models``). Their requests are forwarded (``server/remote``);
health checks eject a failing backend and re-admit it once it answers again (group "remote variants").
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading

log = logging.getLogger("modegpt.serve")

DEFAULT_NAME = "modegpt"
REMOTE_KEY_ENV = "MODEGPT_REMOTE_API_KEY"  # bearer key sent to remote backends


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the original and the compressed model (OpenAI-compatible API)",
                              description=__doc__)
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--original", default=None,
                   help="original MODEL (HF dir, .gguf, 'smollm2-135m', 'random:<preset>' or a checkpoint), or "
                        "the base URL of an OpenAI-compatible server (http://host:8001/v1[#MODEL_ID]); "
                        "default: smollm2-135m when --compressed is not given either")
    p.add_argument("--compressed", default=None,
                   help="ModeGPT checkpoint directory, or the base URL of an OpenAI-compatible server "
                        "(http://host:8002/v1[#MODEL_ID]); default: the cached compressed smollm2-135m "
                        "(made once) when --original is not given either")
    p.add_argument("--name", default=None,
                   help=f"public model id, canary-routed between the two models (default {DEFAULT_NAME}, "
                        "or the canary config's public_name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (default: bfloat16 on cuda and on CPUs with native bf16 "
                        "(AVX512-BF16 or AMX), float32 on other CPUs)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache budget of EACH model, GiB")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_security_arguments(p)
    add_admission_arguments(p)
    add_canary_arguments(p)
    add_remote_arguments(p)


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    from .api.protocol import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_GENERATION_TOKENS

    g = p.add_argument_group("security and limits", "docs/OPERATIONS.md, section Limits")
    g.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1/* (repeatable; also $MODEGPT_API_KEY, "
                        "comma-separated); /health, /metrics and /dashboard stay open")
    g.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; '*' for any); default: CORS off")
    g.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, metavar="N",
                   help=f"largest request body, bytes (default {DEFAULT_MAX_BODY_BYTES}); larger: 413")
    g.add_argument("--max-generation-tokens", type=int, default=DEFAULT_MAX_GENERATION_TOKENS, metavar="N",
                   help="most tokens one request may ask to generate, prompts x max(n, best_of) x max_tokens "
                        f"(default {DEFAULT_MAX_GENERATION_TOKENS}); more: 400")


def add_admission_arguments(p: argparse.ArgumentParser) -> None:
    from .api.admission import Limits

    d = Limits()
    g = p.add_argument_group("overload and shutdown", "docs/OPERATIONS.md, section Limits")
    g.add_argument("--max-pending", type=int, default=d.max_pending, metavar="N",
                   help=f"completion requests in flight at most (default {d.max_pending}; 0: no bound); "
                        "more: 429 with Retry-After")
    g.add_argument("--request-timeout", type=float, default=d.request_timeout_s, metavar="S",
                   help=f"a request still running S seconds after admission is aborted and answered 504 "
                        f"(default {d.request_timeout_s:g}; 0: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=d.shutdown_timeout_s, metavar="S",
                   help=f"after SIGTERM, new requests get 503 while the ones in flight finish for up to S "
                        f"seconds (default {d.shutdown_timeout_s:g})")


def add_canary_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("canary", "routing of the public id between the original and the compressed model "
                                       "(flags override --canary-config)")
    g.add_argument("--canary-config", metavar="FILE", default=None, help="YAML canary configuration")
    g.add_argument("--no-canary", action="store_true",
                   help="disable canary routing: the public id always answers with the original")
    g.add_argument("--canary-weight", type=float, default=None, metavar="W",
                   help="fraction 0..1 of public-id traffic answered by the compressed model "
                        "(embedded default 0.1; 0 with explicit models)")
    g.add_argument("--shadow-fraction", type=float, default=None, metavar="F",
                   help="fraction 0..1 of compared requests also run on the other variant in the background "
                        "(embedded default 0.2; 0 with explicit models)")
    g.add_argument("--score-fraction", type=float, default=None, metavar="F",
                   help="fraction 0..1 of public-id answers scored under both models (default 1; 0 with "
                        "explicit models)")
    g.add_argument("--canary-sticky", action=argparse.BooleanOptionalAction, default=None,
                   help="same `user` / x-canary-key -> same variant (default on)")
    g.add_argument("--canary-seed", type=int, default=None, help="seed of the routing and sampling draws")
    g.add_argument("--admin-key", action="append", default=None, metavar="KEY",
                   help="admin API key (repeatable; also $MODEGPT_ADMIN_KEY, comma-separated)")
    g.add_argument("--critical-key", action="append", default=None, metavar="KEY",
                   help="API key whose requests are always answered by the original (repeatable)")
    g.add_argument("--rollout-steps", default=None, metavar="W,W,...",
                   help="staged rollout weights (default 0.01,0.05,0.25,0.5,1)")
    g.add_argument("--rollout-interval", type=float, default=None, metavar="S", help="hold per step, seconds")
    g.add_argument("--rollout-auto-start", action=argparse.BooleanOptionalAction, default=None,
                   help="start the staged rollout at boot (else POST /admin/canary/resume starts it)")
    g.add_argument("--max-kl-mean", type=float, default=None, help="rollout check: max mean KL (nats)")
    g.add_argument("--min-top1-agreement", type=float, default=None, help="rollout check: min top-1 agreement")
    g.add_argument("--max-error-rate", type=float, default=None, help="rollout check: max compressed error rate")
    g.add_argument("--max-latency-ratio", type=float, default=None,
                   help="rollout check: max p90 latency ratio compressed/original")
    g.add_argument("--min-comparisons", type=int, default=None, help="comparisons needed to judge a step")
    g.add_argument("--max-consecutive-errors", type=int, default=None,
                   help="compressed failures in a row that disable the canary at once")
    g.add_argument("--stall-timeout", type=float, default=None, metavar="S",
                   help="no first token from the compressed model within S seconds: a failure, retried on "
                        "the original")
    g.add_argument("--review-db", default=None, metavar="PATH", help="review queue database (SQLite)")


def _positive(cast):
    def parse(text: str):
        value = cast(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def add_remote_arguments(p: argparse.ArgumentParser) -> None:
    from .remote.backend import RemoteOptions

    d = RemoteOptions()
    g = p.add_argument_group("remote variants", "--original / --compressed given as an OpenAI-compatible base URL; "
                             f"a bearer key for the backends comes from ${REMOTE_KEY_ENV} (docs/OPERATIONS.md)")
    g.add_argument("--remote-connect-timeout", type=_positive(float), default=d.connect_timeout_s, metavar="S",
                   help=f"seconds to open a connection to a backend (default {d.connect_timeout_s:g})")
    g.add_argument("--remote-read-timeout", type=_positive(float), default=d.read_timeout_s, metavar="S",
                   help=f"seconds a backend may stay silent while answering (default {d.read_timeout_s:g})")
    g.add_argument("--remote-retries", type=_non_negative_int, default=d.retries, metavar="N",
                   help=f"retries of a request that failed to connect or got 502/503/504, only before anything "
                        f"was relayed to the client (default {d.retries})")
    g.add_argument("--remote-health-interval", type=_positive(float), default=d.health_interval_s, metavar="S",
                   help=f"seconds between health checks of a backend (default {d.health_interval_s:g})")
    g.add_argument("--remote-eject-after", type=_positive(int), default=d.eject_after, metavar="N",
                   help=f"consecutive failures (requests or checks) that eject a backend (default {d.eject_after})")
    g.add_argument("--remote-readmit-after", type=_positive(int), default=d.readmit_after, metavar="N",
                   help=f"consecutive successful checks that re-admit an ejected backend (default {d.readmit_after})")
    g.add_argument("--remote-score-logprobs", type=_positive(int), default=d.score_logprobs, metavar="K",
                   help=f"top-k logprobs asked for when scoring divergence over the API (default "
                        f"{d.score_logprobs}, the usual server cap)")


def remote_options(args):
    from .remote.backend import RemoteOptions

    return RemoteOptions(connect_timeout_s=args.remote_connect_timeout, read_timeout_s=args.remote_read_timeout,
                         retries=args.remote_retries, health_interval_s=args.remote_health_interval,
                         eject_after=args.remote_eject_after, readmit_after=args.remote_readmit_after,
                         score_logprobs=args.remote_score_logprobs, api_key=os.environ.get(REMOTE_KEY_ENV) or None)


def model_specs(args) -> tuple[str | None, str | None]:
    """(original spec, compressed checkpoint): the embedded default when neither is given."""
    if args.original is None and args.compressed is None:
        from compressor.default import DEFAULT_MODEL, ensure_default_checkpoint

        return DEFAULT_MODEL, str(ensure_default_checkpoint())
    return args.original, args.compressed


def _device_and_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is not None:
        return device, getattr(torch, args.dtype)
    from server.engine.dtypes import default_dtype

    return device, default_dtype(device)


def canary_config(args):
    """The CanaryConfig of a serve invocation (raises ``ConfigError`` with a clear message)."""
    from .canary.config import config_from_args

    return config_from_args(args, embedded_default=args.original is None and args.compressed is None)


def load_engines(args, registry, config=None, canary_metrics=None, review_queue=None) -> None:
    """Load both models, start their engines (or connect to their remote backends) and fill ``registry``
    (runs in a background thread); with both models and a canary config, attach a canary for the public
    id."""
    from compressor.loading import load_modegpt
    from server.engine.async_engine import AsyncEngine

    from .api.registry import ServedModel
    from .remote.backend import RemoteBackend, RemoteSpec, is_remote_spec

    served = []
    name = config.public_name if config is not None else (args.name or DEFAULT_NAME)
    try:
        original, compressed = model_specs(args)
        device, dtype = _device_and_dtype(args)
        for role, spec in (("original", original), ("compressed", compressed)):
            if spec is None:
                continue
            parent = served[0].name if role == "compressed" and served else None
            if is_remote_spec(spec):
                backend = RemoteBackend(RemoteSpec.parse(spec), remote_options(args))
                log.info("%s model: the backend at %s", role, backend.base_url)
                backend.connect()  # waits for /v1/models unless the spec names the model
                model_id = backend.model_id
                if any(s.name == model_id for s in served) or model_id == name:
                    model_id = f"{model_id}-{role}"
                served.append(ServedModel(model_id, None, root=backend.model_id, parent=parent, variant=role,
                                          remote=backend))
                continue
            log.info("loading %s model %s on %s (%s)", role, spec, device, dtype)
            loaded = load_modegpt(spec, device, dtype)
            if loaded.tokenizer is None:
                raise ValueError(f"{spec} has no tokenizer; the server needs one to read and write text")
            model_id = loaded.model_id
            if any(s.name == model_id for s in served) or model_id == name:
                model_id = f"{model_id}-{role}"
            engine = AsyncEngine(model_id, loaded.config, loaded.state_dict, loaded.tokenizer, device=device,
                                 dtype=dtype, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                                 max_model_len=args.max_model_len)
            engine.start()
            served.append(ServedModel(model_id, engine, root=str(spec), parent=parent, variant=role))
        if not served:
            raise ValueError("nothing to serve")
        for s in served:
            registry.add(s)
        registry.add_alias(name, served[0].name)
        remote_metrics = _watch_remotes(served, canary_metrics)
        if config is not None and len(served) == 2:
            from .canary.canary import Canary

            canary = Canary(config, served[0], served[1], metrics=canary_metrics, review_queue=review_queue)
            registry.set_canary(canary)
            canary.start_ticker()
            if remote_metrics is not None and canary.scoring_top_k is not None:
                remote_metrics.set_top_k(canary.scoring_top_k)
            log.info("canary on %s: %s at weight %g, shadow fraction %g, rollout %s", name,
                     "enabled" if config.enabled else "disabled", canary.router.weight, config.shadow_fraction,
                     canary.rollout.state)
        registry.mark_ready()
        log.info("serving %s", ", ".join(registry.public_ids()))
    except Exception as e:  # reported on /health; the process keeps answering
        log.exception("model loading failed")
        registry.mark_failed(f"{type(e).__name__}: {e}")
        for s in served:
            if s not in registry.served():
                s.shutdown()


def _watch_remotes(served: list, canary_metrics=None):
    """Start the health checks of the remote models; their metrics go on the app's registry."""
    remotes = [s for s in served if s.remote is not None]
    metrics = None
    if remotes and canary_metrics is not None:
        from .remote.metrics import RemoteMetrics

        metrics = RemoteMetrics(canary_metrics.registry)
        for s in remotes:
            metrics.watch(s.variant, s.remote)
    for s in remotes:
        s.remote.start_health_checks()
    return metrics


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    import uvicorn

    from .api.admission import Admission, Limits
    from .api.app import build_app
    from .api.lifecycle import GracefulServer
    from .api.registry import ModelRegistry
    from .canary.config import ConfigError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = canary_config(args)
    except ConfigError as e:
        print(f"modegpt serve: {e}", file=sys.stderr)
        return 2
    if cfg.enabled and not cfg.admin_keys:
        log.warning("no admin key configured (--admin-key or $MODEGPT_ADMIN_KEY): the admin API refuses every call")
    review_queue = None
    if cfg.enabled and cfg.shadow_fraction > 0:
        try:
            from .canary.review import ReviewQueue

            review_queue = ReviewQueue(cfg.review_db)
        except Exception as e:  # the canary runs without a review queue
            log.warning("review queue unavailable: %s", e)
    try:
        admission = Admission(Limits(max_pending=args.max_pending, request_timeout_s=args.request_timeout,
                                     shutdown_timeout_s=args.shutdown_timeout))
    except ValueError as e:
        print(f"modegpt serve: {e}", file=sys.stderr)
        return 2
    registry = ModelRegistry()
    from .api.auth import API_KEY_ENV, split_keys
    from .api.protocol import RequestLimits

    app = build_app(registry, admin_keys=cfg.admin_keys, review_queue=review_queue,
                    api_keys=split_keys(args.api_key, API_KEY_ENV), cors_origins=args.cors_origin or (),
                    limits=RequestLimits(args.max_generation_tokens, args.max_body_bytes), admission=admission)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=5)
    server = GracefulServer(config, admission)  # SIGTERM: drain, then exit 0 (server.api.lifecycle)
    sock = bind_socket(args.host, args.port)
    print(f"modegpt serve: listening on http://{args.host}:{sock.getsockname()[1]} (models loading)", flush=True)
    loader = threading.Thread(target=load_engines, args=(args, registry, cfg, app.state.canary_metrics,
                                                         review_queue), name="model-loader", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        if registry.canary is not None:
            registry.canary.stop()
        for s in registry.served():
            s.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
