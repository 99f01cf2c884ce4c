"""Real parts for API tests: a uvicorn server on a loopback port in a thread, and a "scripted" ModeGPT
model whose greedy continuation is known in advance.

The scripted model is an ordinary ModeGPT checkpoint (``server.engine.testing.llama_like_config``
shapes) whose attention and MLP weights are zero, so the residual stream is the token embedding.
Chain tokens get orthogonal embeddings and ``lm_head`` maps each onto its successor with a margin of
~40 nats, so the engine deterministically walks the chain: text, multi-byte characters split across
byte tokens, stop strings and EOS can then be asserted exactly.
"""
from __future__ import annotations

import threading
import time

import torch
import uvicorn
from torch import Tensor

from server.engine.testing import llama_like_config, random_state_dict


def scripted_model(tokenizer, script: str, eos_after: str | None = None, vocab_size: int = 300,
                   margin: float = 5.0) -> tuple[dict, dict[str, Tensor], list[int]]:
    """(config, state_dict, chain): greedy decoding after any chain token continues the chain
    cyclically. ``eos_after``: a one-token string whose successor is EOS."""
    chain = list(tokenizer(script, add_special_tokens=False)["input_ids"])
    if len(set(chain)) != len(chain):
        raise ValueError(f"script {script!r} repeats a token: {chain}")
    successors = {a: b for a, b in zip(chain, chain[1:] + chain[:1])}
    if eos_after is not None:
        (tok,) = tokenizer(eos_after, add_special_tokens=False)["input_ids"]
        if tok in successors:
            raise ValueError("eos_after must not be part of the script")
        successors[tok] = tokenizer.eos_token_id
    config = llama_like_config(vocab_size=vocab_size)
    D = config["hidden_size"]
    if len(successors) > D:
        raise ValueError(f"at most {D} chain tokens")
    sd = random_state_dict(config, seed=1)
    for name, t in sd.items():
        if ".self_attn." in name or ".mlp." in name:
            sd[name] = torch.zeros_like(t)
        elif "norm" in name:
            sd[name] = torch.ones_like(t)
    emb = sd["model.embed_tokens.weight"] * 0.01
    head = torch.zeros(vocab_size, D)
    for slot, (a, b) in enumerate(successors.items()):
        emb[a] = 0.0
        emb[a, slot] = 1.0
        head[b, slot] = margin
    sd["model.embed_tokens.weight"] = emb
    sd["lm_head.weight"] = head
    return config, sd, chain


class ServerThread:
    """``uvicorn.Server`` for an ASGI app on 127.0.0.1 (an ephemeral port) in a daemon thread."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.host = host
        self.port: int | None = None

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self._thread.join(timeout)


SCRIPT = "hello é漢🙂!"  # the scripted model's cycle: ASCII, 2-, 3- and 4-byte characters
RANDOM_MAX_LEN = 64
SCRIPT_MAX_LEN = 4096


class TinyStack:
    """Two real AsyncEngines behind a real app on a loopback port:

    - ``tiny-random``: random llama-like weights (float32), ``max_model_len`` 64;
    - ``tiny-script``: the scripted model (parent ``tiny-random``), ``max_model_len`` 4096;
    - ``tiny``: an alias of ``tiny-random`` (the public NAME).
    """

    def __init__(self, variants: dict[str, str] | None = None, admission=None):
        """``variants``: served model name -> ``variant`` metrics label (default: the name itself);
        ``admission``: the app's ``server.api.admission.Admission`` (default limits when None)."""
        from server.engine.async_engine import AsyncEngine
        from server.engine.testing import byte_tokenizer

        from .app import build_app
        from .registry import ModelRegistry, ServedModel

        self.tokenizer = byte_tokenizer()
        cfg, sd, self.chain = scripted_model(self.tokenizer, SCRIPT, eos_after="x")
        rcfg = llama_like_config()
        self.random_engine = AsyncEngine("tiny-random", rcfg, random_state_dict(rcfg), self.tokenizer,
                                         dtype=torch.float32, kv_cache_bytes=16 << 20, max_model_len=RANDOM_MAX_LEN)
        self.script_engine = AsyncEngine("tiny-script", cfg, sd, self.tokenizer, dtype=torch.float32,
                                         kv_cache_bytes=16 << 20, max_model_len=SCRIPT_MAX_LEN)
        self.random_engine.start()
        self.script_engine.start()
        self.registry = ModelRegistry()
        variants = variants or {}
        self.registry.add(ServedModel("tiny-random", self.random_engine, root="random:tiny-llama",
                                      variant=variants.get("tiny-random")))
        self.registry.add(ServedModel("tiny-script", self.script_engine, root="scripted", parent="tiny-random",
                                      variant=variants.get("tiny-script")))
        self.registry.add_alias("tiny", "tiny-random")
        self.registry.mark_ready()
        self.app = build_app(self.registry, admission=admission)
        self.server = ServerThread(self.app).start()

    @property
    def url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.stop()
        self.random_engine.shutdown()
        self.script_engine.shutdown()


def wait_engines_clean(*engines, timeout: float = 30.0) -> None:
    """Wait until every engine has no running or waiting sequence and no KV block in use (an abort or a
    finished request frees its blocks at once; this bounds "at once" by ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [e.stats() for e in engines]
        if all(s.num_running == 0 and s.num_waiting == 0 and s.kv_cache_usage == 0.0 for s in stats):
            return
        assert time.monotonic() < deadline, f"engines not clean: {stats}"
        time.sleep(0.02)
