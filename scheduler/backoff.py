"""How long a model waits after its workers fail to start: 1 s, doubling to the maximum,
and what its requests are told meanwhile. Pure: the core keeps one ``Backoff`` per model
(and one for stem cells)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ModelUnavailable, WanwuError


@dataclass
class Backoff:
    failures: int = 0
    until: float = 0.0
    last_error: str = ""

    def failed(self, now: float, error: WanwuError | str, base_s: float, max_s: float) -> None:
        """One more failed start at ``now``: wait twice as long as after the last."""
        self.failures += 1
        self.until = now + self.delay(base_s, max_s)
        text = str(error)
        self.last_error = text.splitlines()[0][:300] if text else type(error).__name__

    def delay(self, base_s: float, max_s: float) -> float:
        return min(max_s, base_s * 2.0 ** (self.failures - 1))

    def error(self, model: str, now: float) -> ModelUnavailable:
        """What a request for ``model`` gets while it backs off."""
        wait = self.until - now
        return ModelUnavailable(
            f"model {model} failed to start {self.failures} time(s) in a row; next try in {wait:.1f} s. "
            f"Last error: {self.last_error}",
            retry_after_s=wait,
        )
