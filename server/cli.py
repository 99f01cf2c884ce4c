"""``modegpt serve``: the original and the compressed model side by side behind one OpenAI-compatible API.

The socket is bound and uvicorn serves at once (``/health`` answers 503); the models load in a
background thread and the registry is marked ready when every engine is up. Public model ids: the
original's id, the compressed model's id, and ``--name`` (an alias of the original).
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
    p.add_argument("--name", default=DEFAULT_NAME,
                   help=f"public model id aliasing the original (default {DEFAULT_NAME})")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and compute dtype (default: bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="KV-cache budget of EACH model, GiB")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


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


def load_engines(args, registry) -> None:
    """Load both models, start their engines and fill ``registry`` (runs in a background thread)."""
    from compressor.loading import load_modegpt
    from server.engine.async_engine import AsyncEngine

    from .api.registry import ServedModel

    served = []
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
            if any(s.name == model_id for s in served) or model_id == args.name:
                model_id = f"{model_id}-{role}"
            engine = AsyncEngine(model_id, loaded.config, loaded.state_dict, loaded.tokenizer, device=device,
                                 dtype=dtype, kv_cache_bytes=int(args.kv_cache_gb * (1 << 30)),
                                 max_model_len=args.max_model_len)
            engine.start()
            parent = served[0].name if role == "compressed" and served else None
            served.append(ServedModel(model_id, engine, root=str(spec), parent=parent))
        if not served:
            raise ValueError("nothing to serve")
        for s in served:
            registry.add(s)
        registry.add_alias(args.name, served[0].name)
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

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = ModelRegistry()
    app = build_app(registry)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="off", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    sock = bind_socket(args.host, args.port)
    print(f"modegpt serve: listening on http://{args.host}:{sock.getsockname()[1]} (models loading)", flush=True)
    loader = threading.Thread(target=load_engines, args=(args, registry), name="model-loader", daemon=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    finally:
        for s in registry.served():
            s.engine.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.cli", description=__doc__)
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
