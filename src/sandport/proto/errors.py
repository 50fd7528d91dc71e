"""Errors shared by the sans-I/O protocol modules."""

from __future__ import annotations


class RemoteProtocolError(Exception):
    """The peer sent bytes that violate the protocol.

    Base class for every error caused by wire input. Protocol modules raise a specific subclass
    for each kind of bad input, so callers can catch this one class to tell "the peer is broken
    or hostile" apart from a bug in our own code (which surfaces as any other exception).
    """
