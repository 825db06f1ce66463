"""The failure and scaling policies, without a cluster, on a fake clock."""

from __future__ import annotations

import pytest

from raymoe.actors.policy import FailureAction, FailurePolicy, Layout, ScalingPolicy
from raymoe.platform.config import ConfigError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_policy_backs_off_then_gives_up() -> None:
    clock = FakeClock()
    policy = FailurePolicy(max_failures=3, backoff_s=1.0, max_backoff_s=3.0, reset_after_s=60.0, clock=clock)
    delays = []
    for _ in range(3):
        d = policy.on_failure("ExpertShard(1) died")
        assert d.action is FailureAction.RETRY
        delays.append(d.delay_s)
        clock.now += 5
    assert delays == [1.0, 2.0, 3.0]  # doubling, capped
    last = policy.on_failure("AttentionStage(replica 0, stage 1) died")
    assert last.action is FailureAction.RAISE and "4 failures" in last.reason and "stage 1" in last.reason


def test_failure_policy_window_and_reset() -> None:
    clock = FakeClock()
    policy = FailurePolicy(max_failures=2, window_s=100.0, backoff_s=1.0, reset_after_s=30.0, clock=clock)
    assert policy.on_failure().delay_s == 1.0
    clock.now += 10
    assert policy.on_failure().delay_s == 2.0
    clock.now += 200  # both earlier failures left the window, and the streak was reset
    d = policy.on_failure()
    assert d.action is FailureAction.RETRY and d.delay_s == 1.0
    clock.now += 1
    assert policy.on_failure().action is FailureAction.RETRY
    clock.now += 1
    assert policy.on_failure().action is FailureAction.RAISE  # three within 100 s


def test_scaling_policy_shrinks_to_what_fits_and_keeps_the_global_batch() -> None:
    policy = ScalingPolicy(max_dp=2, max_ep=3, micro_batches=2, pp=2)
    full = Layout(2, 3, 2)
    assert policy.decide(full, None) is None  # no resource limits: stay
    assert policy.decide(None, None) == full
    assert policy.decide(full, 7) is None  # 2 × 2 stages + 3 shards
    assert policy.decide(full, 6) == Layout(2, 2, 2)  # a shard lost: experts re-placed on two
    assert policy.decide(full, 5) == Layout(2, 1, 2)
    assert policy.decide(full, 4) == Layout(1, 2, 4)  # one replica takes both replicas' micro-batches
    assert policy.decide(Layout(1, 2, 4), 7) == full  # resources back: grow
    for layout in policy.layouts():
        assert layout.dp * layout.micro_batches == 4
    with pytest.raises(ConfigError, match="smallest allowed layout"):
        policy.decide(full, 2)


def test_scaling_policy_respects_minimums_and_divisibility() -> None:
    policy = ScalingPolicy(max_dp=3, max_ep=4, micro_batches=1, pp=1, min_ep=2)
    assert {lay.dp for lay in policy.layouts()} == {1, 3}  # dp=2 cannot split 3 micro-batches
    assert all(lay.ep >= 2 for lay in policy.layouts())
    assert policy.decide(None, 4) == Layout(1, 3, 3)
    with pytest.raises(ConfigError, match="min_ep"):
        ScalingPolicy(max_dp=1, max_ep=2, micro_batches=1, min_ep=3)
