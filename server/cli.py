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
"""
from __future__ import annotations

import argparse
import logging
import socket
import sys
import threading

log = logging.getLogger("modegpt.serve")

DEFAULT_NAME = "modegpt"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve the original and the compressed model (OpenAI-compatible API)",
                              description=__doc__)
    add_serve_arguments(p)
    p.set_defaults(func=run_serve)
    return p


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--original", default=None,
                   help="original MODEL (HF dir, .gguf, 'smollm2-135m', 'random:<preset>' or a checkpoint); "
                        "default: smollm2-135m when --compressed is not given either")
    p.add_argument("--compressed", default=None,
                   help="ModeGPT checkpoint directory; default: the cached compressed smollm2-135m "
                        "(made once) when --original is not given either")
    p.add_argument("--name", default=None,
                   help=f"public model id, canary-routed between the two models (default {DEFAULT_NAME}, "
                        "or the canary config's public_name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache budget of EACH model, GiB")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    add_canary_arguments(p)


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
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    return device, dtype


def canary_config(args):
    """The CanaryConfig of a serve invocation (raises ``ConfigError`` with a clear message)."""
    from .canary.config import config_from_args

    return config_from_args(args, embedded_default=args.original is None and args.compressed is None)


def load_engines(args, registry, config=None, canary_metrics=None, review_queue=None) -> None:
    """Load both models, start their engines and fill ``registry`` (runs in a background thread); with
    both models and a canary config, attach a canary for the public id."""
    from compressor.loading import load_modegpt
    from server.engine.async_engine import AsyncEngine

    from .api.registry import ServedModel

    served = []
    name = config.public_name if config is not None else (args.name or DEFAULT_NAME)
    try:
        original, compressed = model_specs(args)
        device, dtype = _device_and_dtype(args)
        for role, spec in (("original", original), ("compressed", compressed)):
            if spec is None:
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
            parent = served[0].name if role == "compressed" and served else None
            served.append(ServedModel(model_id, engine, root=str(spec), parent=parent, variant=role))
        if not served:
            raise ValueError("nothing to serve")
        for s in served:
            registry.add(s)
        registry.add_alias(name, served[0].name)
        if config is not None and len(served) == 2:
            from .canary.canary import Canary

            canary = Canary(config, served[0], served[1], metrics=canary_metrics, review_queue=review_queue)
            registry.set_canary(canary)
            canary.start_ticker()
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
                s.engine.shutdown()


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_serve(args) -> int:
    import uvicorn

    from .api.app import build_app
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
    registry = ModelRegistry()
    app = build_app(registry, admin_keys=cfg.admin_keys, review_queue=review_queue)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
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
            s.engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
