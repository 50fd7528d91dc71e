"""The process's splice pipe pool (sandport.net.splice.PipePool): bounds, reuse, discard."""

from __future__ import annotations

import os

import pytest

from sandport.net.splice import KEEP_FREE, PipePool

pytestmark = pytest.mark.unit


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_pool_hands_out_at_most_its_limit_and_counts_refusals() -> None:
    pool = PipePool(2)
    a, b = pool.take(), pool.take()
    assert a is not None and b is not None and a != b
    assert pool.take() is None  # the limit: the taker copies instead
    st = pool.stats
    assert (st.limit, st.in_use, st.free, st.made, st.refused) == (2, 2, 0, 2, 1)
    pool.give(a)
    assert pool.take() == a  # an empty pipe is reused, not made anew
    assert pool.stats.made == 2
    pool.give(a)
    pool.give(b)
    assert (pool.stats.in_use, pool.stats.free) == (0, 2)
    pool.clear()
    assert pool.stats.free == 0 and not _open(a[0]) and not _open(b[1])


def test_a_discarded_pipe_is_closed_never_reused() -> None:
    pool = PipePool(1)
    pipe = pool.take()
    assert pipe is not None
    os.write(pipe[1], b"left over")
    pool.discard(pipe)
    assert not _open(pipe[0]) and not _open(pipe[1])
    fresh = pool.take()
    assert fresh is not None
    with pytest.raises(BlockingIOError):
        os.read(fresh[0], 100)  # empty: nothing of the discarded pipe's bytes
    pool.give(fresh)
    pool.clear()


def test_given_back_pipes_beyond_what_is_kept_are_closed() -> None:
    pool = PipePool(KEEP_FREE + 4)
    pipes = [pool.take() for _ in range(KEEP_FREE + 4)]
    assert all(p is not None for p in pipes)
    for p in pipes:
        assert p is not None
        pool.give(p)
    assert pool.stats.free == KEEP_FREE
    closed = [p for p in pipes if p is not None and not _open(p[0])]
    assert len(closed) == 4
    pool.clear()


def test_resize_closes_kept_pipes_over_the_new_limit() -> None:
    pool = PipePool(4)
    pipes = [pool.take() for _ in range(4)]
    for p in pipes:
        assert p is not None
        pool.give(p)
    assert pool.stats.free == 4
    pool.resize(1)
    assert pool.stats.free == 1 and pool.stats.limit == 1
    with pytest.raises(ValueError, match="max_pipes"):
        pool.resize(-1)
    pool.clear()
