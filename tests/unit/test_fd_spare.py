"""The relay's spare descriptor and the 'descriptors' failure reason (no network needed)."""

from __future__ import annotations

import errno
import os

import pytest

from sandport.forward.tcp import FailureReason, _connect_failure_reason, _SpareDescriptor
from sandport.forward.tcpspec import CONNECT_FAILURES, _zero_failures

pytestmark = pytest.mark.unit


def test_spare_frees_exactly_one_descriptor_and_takes_it_back() -> None:
    spare = _SpareDescriptor()
    assert not spare.release()  # nothing held yet
    assert spare.take() and spare.fd >= 0
    held = spare.fd
    assert spare.take() and spare.fd == held  # taking twice holds one descriptor
    assert spare.release() and spare.fd == -1
    with pytest.raises(OSError):
        os.fstat(held)  # really closed: the next accept gets it
    assert spare.take()
    assert spare.release()


def test_spare_is_held_while_a_forward_runs() -> None:
    spare = _SpareDescriptor()
    spare.hold()
    spare.hold()
    spare.unhold()
    assert spare.fd >= 0  # one forward still runs
    spare.unhold()
    assert spare.fd == -1


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENFILE])
def test_out_of_descriptors_is_its_own_reason_not_a_failed_connect(code: int) -> None:
    reason = _connect_failure_reason(OSError(code, os.strerror(code)))
    assert reason is FailureReason.DESCRIPTORS
    assert reason not in CONNECT_FAILURES  # not the target's fault
    assert _zero_failures()["descriptors"] == 0  # every forward lists it, from 0
