"""``CanaryRouter``: for each request, which variant answers (``original`` | ``compressed``) and why.

Precedence (first match wins), with the bounded ``reason`` label it yields:

1. ``critical``: header ``x-modegpt-critical: true`` or a bearer API key listed in the critical
   policy. Always the ORIGINAL, even when the request pins the compressed model by id or header:
   critical wins over pinning, so a critical caller can never be served by the compressed model.
2. ``pinned_model``: the request named a variant's own model id.
3. ``pinned_header``: ``x-modegpt-variant: original|compressed`` on a request to the public id (other
   values are ignored).
4. ``fallback``: the canary is disabled (configured off, rolled back, the compressed engine failed):
   the original.
5. ``sticky``: sticky hashing is on and the request carries a key (the OpenAI ``user`` field, else the
   ``x-canary-key`` header): ``bucket = sha256(key) -> [0, 1)``; compressed iff ``bucket < weight``.
   A key's bucket never changes, so raising the weight only moves keys from original to compressed.
6. ``weight``: no key: a draw of a seeded RNG; compressed with probability ``weight``.

Weight and the enabled flag may be changed from any thread (admin API, rollout controller).
"""
from __future__ import annotations

import hashlib
import hmac
import random
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

ORIGINAL = "original"
COMPRESSED = "compressed"
VARIANTS = (ORIGINAL, COMPRESSED)
# "failover" is set by the Canary, not the router: the original is down, the compressed model answers
REASONS = ("pinned_model", "pinned_header", "critical", "sticky", "weight", "fallback", "failover")

VARIANT_HEADER = "x-modegpt-variant"
CRITICAL_HEADER = "x-modegpt-critical"
KEY_HEADER = "x-canary-key"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Decision:
    variant: str  # "original" | "compressed"
    reason: str  # one of REASONS
    model_id: str  # the variant's own model id (what the response's `model` field says)


def bucket(key: str) -> float:
    """A key's fixed position in [0, 1): the first 8 bytes of sha256(key) / 2**64."""
    h = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") / float(1 << 64)


def bearer_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def key_in(key: str | None, keys: Iterable[str]) -> bool:
    """Constant-time membership (each comparison is ``hmac.compare_digest``)."""
    if not key:
        return False
    found = False
    kb = key.encode("utf-8")
    for k in keys:
        found |= hmac.compare_digest(kb, k.encode("utf-8"))
    return found


class CanaryRouter:
    def __init__(self, public_id: str, original_id: str, compressed_id: str, weight: float = 0.0, *,
                 sticky: bool = True, critical_keys: Iterable[str] = (), seed: int | None = None,
                 enabled: bool = True):
        if len({public_id, original_id, compressed_id}) != 3:
            raise ValueError("public, original and compressed model ids must differ")
        self.public_id = public_id
        self.ids = {ORIGINAL: original_id, COMPRESSED: compressed_id}
        self.sticky = sticky
        self._critical = tuple(critical_keys)
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._weight = 0.0
        self._enabled = enabled
        self.disabled_reason: str | None = None if enabled else "disabled"
        self.set_weight(weight)

    # -- state (thread-safe) -------------------------------------------------------------------------

    @property
    def weight(self) -> float:
        return self._weight

    def set_weight(self, weight: float) -> None:
        w = float(weight)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"weight must be between 0 and 1, got {weight}")
        with self._lock:
            self._weight = w

    @property
    def enabled(self) -> bool:
        return self._enabled

    def set_enabled(self, enabled: bool, reason: str | None = None) -> None:
        with self._lock:
            self._enabled = enabled
            self.disabled_reason = None if enabled else (reason or "disabled")

    def handles(self, model_id: str | None) -> bool:
        return model_id == self.public_id or model_id in self.ids.values()

    # -- deciding ------------------------------------------------------------------------------------

    def is_critical(self, headers: Mapping[str, str]) -> bool:
        if headers.get(CRITICAL_HEADER, "").strip().lower() in _TRUE:
            return True
        return key_in(bearer_key(headers), self._critical)

    def decide(self, model_id: str | None, headers: Mapping[str, str] | None = None,
               user: str | None = None) -> Decision:
        """``headers``: lower-case names (a Starlette ``Headers`` works as is)."""
        headers = headers if headers is not None else {}
        if self.is_critical(headers):
            return self._d(ORIGINAL, "critical")
        for variant, vid in self.ids.items():
            if model_id == vid:
                return self._d(variant, "pinned_model")
        pin = headers.get(VARIANT_HEADER, "").strip().lower()
        if pin in VARIANTS:
            return self._d(pin, "pinned_header")
        with self._lock:
            enabled, weight = self._enabled, self._weight
            if not enabled:
                return self._d(ORIGINAL, "fallback")
            key = user or headers.get(KEY_HEADER) or None
            if self.sticky and key:
                return self._d(COMPRESSED if bucket(key) < weight else ORIGINAL, "sticky")
            draw = self._rng.random()
        return self._d(COMPRESSED if draw < weight else ORIGINAL, "weight")

    def _d(self, variant: str, reason: str) -> Decision:
        return Decision(variant, reason, self.ids[variant])
