"""Which engine serves which public model id.

``ModelRegistry`` is the one object that resolves the ``model`` field of a request: the served models
(original, compressed) under their own names plus aliases (the public NAME, which points at the
original). With a canary attached (``set_canary``), ``resolve`` hands the public id and the two variants'
ids to ``server.canary.canary.Canary.route`` instead; nothing else in the API looks engines up. A served
model is an in-process engine or a remote backend (``ServedModel.remote``); the completion service
forwards the requests of the latter (``server.remote``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .errors import APIError
from .protocol import ModelCard


@dataclass
class ServedModel:
    """One model and its identity: an in-process ``engine``, or a ``remote`` backend that its requests
    are forwarded to (``server.remote``; ``engine`` is then None)."""

    name: str  # served model name; also the ``model_name`` metrics label
    engine: Any  # server.engine.async_engine.AsyncEngine (None for a remote model)
    root: str | None = None  # where the weights came from (HF id, checkpoint path; a remote model's own id)
    parent: str | None = None  # the model this one derives from (the original, for a compressed one)
    variant: str | None = None  # "original" | "compressed": the ``variant`` metrics label (None: the name)
    created: int = field(default_factory=lambda: int(time.time()))
    remote: Any = None  # server.remote.backend.RemoteBackend

    @property
    def max_model_len(self) -> int | None:
        if self.remote is not None:
            return self.remote.max_model_len
        return int(self.engine.max_model_len)

    @property
    def up(self) -> bool:
        """Can it serve now: the engine runs, or the remote backend is in service (not ejected)."""
        if self.remote is not None:
            return self.remote.health.up
        return bool(getattr(self.engine, "is_running", True))

    def shutdown(self) -> None:
        if self.remote is not None:
            self.remote.close()
        else:
            self.engine.shutdown()


@dataclass
class Route:
    """The outcome of resolving a request's ``model``: the id to echo back and the engine to use."""

    public_id: str  # the id the response's `model` field says (the variant's own id on a canary route)
    served: ServedModel
    variant: str | None = None  # "original" | "compressed" on a canary route
    reason: str | None = None  # the canary router's reason label
    canary: Any = None  # the Canary that routed it (None: a plain model id or alias)
    decision: Any = None  # server.canary.router.Decision
    requested: str | None = None  # the model id the request named


class ModelRegistry:
    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}
        self._ready = False
        self.load_error: str | None = None
        self.canary: Any = None  # server.canary.canary.Canary routing the public id, if any

    # -- building --------------------------------------------------------------------------------

    def add(self, served: ServedModel) -> ServedModel:
        if served.name in self._models or served.name in self._aliases:
            raise ValueError(f"model id {served.name!r} is already registered")
        self._models[served.name] = served
        return served

    def add_alias(self, alias: str, target: str) -> None:
        if target not in self._models:
            raise ValueError(f"alias {alias!r} points at unknown model {target!r}")
        if alias == target:
            return
        if alias in self._models or alias in self._aliases:
            raise ValueError(f"model id {alias!r} is already registered")
        self._aliases[alias] = target

    def set_canary(self, canary: Any) -> None:
        """Route the canary's public id (and its two variants' ids) through ``canary.route``."""
        for v in ("original", "compressed"):
            if canary.served(v).name not in self._models:
                raise ValueError(f"canary variant {canary.served(v).name!r} is not a served model")
        self.canary = canary

    def mark_ready(self) -> None:
        self._ready = True

    def mark_failed(self, message: str) -> None:
        self.load_error = message

    # -- reading ---------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready and self.load_error is None and bool(self._models)

    def health_problem(self) -> str | None:
        """Why the server cannot serve now (None: healthy): loading, a failed load, a stopped engine."""
        if self.load_error:
            return f"model loading failed: {self.load_error}"
        if not self.ready:
            return "models are loading"
        stopped = [m.name for m in self._models.values() if m.remote is None and not m.engine.is_running]
        if stopped:
            return f"engine not running: {', '.join(stopped)}"
        if not any(m.up for m in self._models.values()):  # only remote models, all out of service
            return f"no backend in service: {', '.join(self._models)}"
        return None

    def served(self) -> list[ServedModel]:
        return list(self._models.values())

    def variant_of(self, name: str) -> str:
        """The ``variant`` label of served model ``name``: its role in the canary (``original`` |
        ``compressed``), else the ``variant`` it was registered with, else ``name`` itself."""
        canary = self.canary
        if canary is not None:
            for v in ("original", "compressed"):
                if canary.served(v).name == name:
                    return v
        m = self._models.get(name)
        if m is not None and m.variant:
            return m.variant
        return name

    def public_ids(self) -> list[str]:
        return list(self._models) + list(self._aliases)

    def resolve(self, model_id: str | None, headers: Any = None, user: str | None = None) -> Route:
        """The engine for a request's ``model``; ``headers`` (lower-case names) and ``user`` feed the
        canary router when the id is the canary's."""
        if not self.ready:
            msg = f"model loading failed: {self.load_error}" if self.load_error else "models are still loading"
            raise APIError(msg, status=503)
        if self.canary is not None and self.canary.handles(model_id):
            return self.canary_route(self.canary.route(model_id, headers, user), model_id)
        if model_id is None:
            first = next(iter(self._models.values()))
            return Route(first.name, first)
        if model_id in self._models:
            return Route(model_id, self._models[model_id])
        if model_id in self._aliases:
            return Route(model_id, self._models[self._aliases[model_id]])
        raise APIError(f"The model `{model_id}` does not exist.", status=404, param="model")

    def canary_route(self, decision: Any, requested: str | None) -> Route:
        served = self._models[decision.model_id]
        return Route(decision.model_id, served, variant=decision.variant, reason=decision.reason,
                     canary=self.canary, decision=decision, requested=requested)

    def cards(self) -> list[ModelCard]:
        cards = [ModelCard(id=m.name, created=m.created, root=m.root or m.name, parent=m.parent,
                           max_model_len=m.max_model_len) for m in self._models.values()]
        for alias, target in self._aliases.items():
            m = self._models[target]
            cards.append(ModelCard(id=alias, created=m.created, root=m.root or m.name, parent=m.name,
                                   max_model_len=m.max_model_len))
        return cards
