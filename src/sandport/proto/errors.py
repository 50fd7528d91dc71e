"""Errors shared by the sans-I/O protocol modules: one hierarchy for the whole package.

Two families, never mixed:

* :class:`RemoteProtocolError`: the *peer* sent bytes that violate the protocol. Every
  parser raises a specific subclass for each kind of bad wire input, so a caller catches
  this one class to tell "the peer is broken or hostile" from a bug of ours.
* :class:`LocalProtocolError` and :class:`InvalidTransition`: *our* code used a protocol
  object out of order, or a state machine was asked for an edge its table does not have.
  Both are bugs, never wire input; they are ``RuntimeError`` so no ``except
  RemoteProtocolError`` can swallow them.
"""

from __future__ import annotations


class RemoteProtocolError(Exception):
    """The peer sent bytes that violate the protocol.

    Base class for every error caused by wire input. Protocol modules raise a specific subclass
    for each kind of bad input, so callers can catch this one class to tell "the peer is broken
    or hostile" apart from a bug in our own code (which surfaces as any other exception).
    """


class LocalProtocolError(RuntimeError):
    """The caller used a protocol object out of order (for example, data after the end)."""


class InvalidTransition(RuntimeError):
    """A state machine was asked for a transition its table does not have: a bug in the
    caller or the module, never wire input."""
