"""What the driver does when actors die or resources change: small classes that return decisions.

In the spirit of Ray Train v2's failure and scaling policies, these hold no Ray state and do
nothing themselves: the driver asks, then acts. Both take a clock, so tests drive them with a
fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from raymoe.platform.config import ConfigError


class FailureAction(Enum):
    RETRY = "retry"  # rebuild the graph and restore the latest checkpoint
    RAISE = "raise"  # give up: the run fails with the last error


@dataclass(frozen=True)
class FailureDecision:
    action: FailureAction
    delay_s: float = 0.0  # wait this long before rebuilding
    reason: str = ""


@dataclass
class FailurePolicy:
    """At most ``max_failures`` failures in any ``window_s`` seconds; exponential backoff between retries.

    The backoff starts at ``backoff_s`` and doubles with every failure that follows the previous
    one within ``reset_after_s`` (a graph that then ran well for a while starts again at
    ``backoff_s``), up to ``max_backoff_s``.
    """

    max_failures: int = 3
    window_s: float = float("inf")
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 300.0
    clock: Callable[[], float] = time.monotonic
    failures: list[float] = field(default_factory=list)
    _streak: int = 0

    def on_failure(self, cause: str = "") -> FailureDecision:
        """Record a failure now; decide whether to retry (and after how long) or give up."""
        now = self.clock()
        if self.failures and now - self.failures[-1] > self.reset_after_s:
            self._streak = 0
        self.failures.append(now)
        recent = [t for t in self.failures if now - t <= self.window_s]
        if len(recent) > self.max_failures:
            return FailureDecision(
                FailureAction.RAISE,
                reason=f"{len(recent)} failures (more than elastic.max_failures={self.max_failures}); last: {cause}",
            )
        delay = min(self.backoff_s * 2**self._streak, self.max_backoff_s)
        self._streak += 1
        return FailureDecision(FailureAction.RETRY, delay_s=delay, reason=cause)


@dataclass(frozen=True)
class Layout:
    """The elastic part of a graph's shape: attention replicas, their micro-batches, expert shards (pp is fixed)."""

    dp: int
    ep: int
    micro_batches: int  # per replica; dp × micro_batches stays the global batch's micro-batches

    def actors(self, pp: int) -> int:
        return self.dp * pp + self.ep


@dataclass
class ScalingPolicy:
    """Elastic layouts between minimum and maximum expert shards and attention replicas.

    The global batch's micro-batches (``dp × micro_batches``) never change, so the math of a
    step is the same at every layout: fewer replicas take more micro-batches each. ``decide``
    returns the largest layout that fits the actors the cluster can hold, preferring to keep
    replicas over shards when shrinking (a shard's experts are re-placed on the others), or None
    when the current layout should stay.
    """

    max_dp: int
    max_ep: int
    micro_batches: int  # per replica at max_dp
    pp: int = 1
    min_dp: int = 1
    min_ep: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ep <= self.max_ep:
            raise ConfigError(f"elastic.min_ep ({self.min_ep}) must be in [1, parallel.ep={self.max_ep}]")
        if not 1 <= self.min_dp <= self.max_dp:
            raise ConfigError(f"elastic.min_dp ({self.min_dp}) must be in [1, parallel.dp={self.max_dp}]")

    @property
    def global_micro_batches(self) -> int:
        return self.max_dp * self.micro_batches

    def layouts(self) -> list[Layout]:
        """Every allowed layout, largest first (more actors first; at equal count, more replicas)."""
        out = [
            Layout(dp, ep, self.global_micro_batches // dp)
            for dp in range(self.min_dp, self.max_dp + 1)
            if self.global_micro_batches % dp == 0
            for ep in range(self.min_ep, self.max_ep + 1)
        ]
        return sorted(out, key=lambda layout: (layout.actors(self.pp), layout.dp), reverse=True)

    @property
    def full(self) -> Layout:
        return Layout(self.max_dp, self.max_ep, self.micro_batches)

    def decide(self, current: Layout | None, placeable: int | None) -> Layout | None:
        """The layout to run now, given how many actors can be placed (None: no limit); None to keep ``current``.

        Raises ConfigError when not even the minimum layout fits."""
        for layout in self.layouts():
            if placeable is None or layout.actors(self.pp) <= placeable:
                return None if layout == current else layout
        smallest = Layout(self.min_dp, self.min_ep, self.global_micro_batches // self.min_dp)
        raise ConfigError(
            f"only {placeable} actors can be placed; the smallest allowed layout (dp={self.min_dp}, "
            f"ep={self.min_ep}) needs {smallest.actors(self.pp)}"
        )
