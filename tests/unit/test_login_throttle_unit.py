"""Failed VNC logins per client address (bridge/throttle.py): counts, blocks, bounds."""

from __future__ import annotations

import pytest

from sandport.bridge.throttle import LoginThrottle, ThrottleConfig

pytestmark = pytest.mark.unit


def test_failures_within_the_window_block_the_address_and_only_it() -> None:
    t = LoginThrottle(ThrottleConfig(failures=3, window=60, block=10))
    assert [t.failed("10.0.0.1", now) for now in (0.0, 1.0)] == [0.0, 0.0]
    assert t.retry_after("10.0.0.1", 2.0) == 0.0
    assert t.failed("10.0.0.1", 2.0) == 10.0  # the third within 60 s
    assert t.retry_after("10.0.0.1", 5.0) == 7.0
    assert t.retry_after("10.0.0.2", 5.0) == 0.0  # another client is not affected
    assert t.retry_after("10.0.0.1", 12.0) == 0.0  # the block is over


def test_old_failures_fall_out_of_the_window_and_a_success_clears() -> None:
    t = LoginThrottle(ThrottleConfig(failures=3, window=60, block=10))
    t.failed("a", 0.0)
    t.failed("a", 1.0)
    assert t.failed("a", 61.5) == 0.0  # the first is older than the window
    t.failed("b", 0.0)
    t.failed("b", 1.0)
    t.succeeded("b")
    assert t.failed("b", 2.0) == 0.0


def test_blocks_in_a_row_double_up_to_the_longest() -> None:
    t = LoginThrottle(ThrottleConfig(failures=1, window=60, block=10, max_block=35))
    now, blocks = 0.0, []
    for _ in range(4):
        block = t.failed("a", now)
        blocks.append(block)
        now += block
    assert blocks == [10.0, 20.0, 35.0, 35.0]
    t.succeeded("a")
    assert t.failed("a", now) == 10.0  # a success starts again from the first block


def test_the_table_is_bounded() -> None:
    t = LoginThrottle(ThrottleConfig(failures=2, window=60, block=10, max_clients=3))
    for i in range(10):
        t.failed(f"10.0.0.{i}", 0.0)
    t.failed("10.0.0.9", 1.0)  # the newest entries are kept
    assert t.retry_after("10.0.0.9", 2.0) > 0
    assert t.failed("10.0.0.0", 1.0) == 0.0  # forgotten: its count starts again
