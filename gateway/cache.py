"""A TTL cache of answers keyed by the SHA-256 of the image bytes, the model, its
bundle's digest (a replaced bundle's answers are never served for the new one) and what
was asked of it (top_k and a label subset, or an embedding).
Identical uploads (retries, duplicate frames) are answered without touching a worker."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Hashable
from typing import Any

from cachetools import TTLCache


class ResultCache:
    def __init__(self, size: int, ttl_s: float, enabled: bool = True) -> None:
        self.enabled = enabled and size > 0
        self._cache: TTLCache[tuple[Hashable, ...], dict[str, Any]] = TTLCache(maxsize=max(1, size), ttl=ttl_s)
        self._lock = threading.Lock()

    def key(self, image: bytes, model: str, *asked: Hashable) -> tuple[Hashable, ...] | None:
        """The cache key, or None when the cache is off (no hashing of a 20 MB upload for nothing)."""
        return (hashlib.sha256(image).hexdigest(), model, *asked) if self.enabled else None

    def get(self, key: tuple[Hashable, ...] | None) -> dict[str, Any] | None:
        if key is None:
            return None
        with self._lock:
            return self._cache.get(key)

    def put(self, key: tuple[Hashable, ...] | None, answer: dict[str, Any]) -> None:
        if key is not None:
            with self._lock:
                self._cache[key] = answer

    def __len__(self) -> int:
        with self._lock:
            return len(self._cache)
