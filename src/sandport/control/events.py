"""Live events: every state change the gateway records, fanned out to watchers.

The store keeps the log (:meth:`~sandport.control.store.StateStore.events`); the hub hands
each new event to every subscriber's queue. A watcher that falls :data:`QUEUE_SIZE` events
behind is dropped (its stream ends; it reconnects with ``Last-Event-ID`` and replays from
the log), so a stuck client never holds the gateway's memory.

Owns: the live fan-out and the SSE framing. Must not touch: the log itself (the store
writes it; :class:`~sandport.control.roster.Roster` publishes what it recorded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from sandport.control.store import EventRecord

QUEUE_SIZE = 1000
PING_SECONDS = 15.0  # an SSE comment line keeps proxies from closing an idle stream


class EventHub:
    """Subscribers' queues; ``None`` in a queue ends that stream."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[EventRecord | None]] = set()
        self.closed = False

    def publish(self, event: EventRecord) -> None:
        """Hand ``event`` to every subscriber; drop the ones that cannot keep up."""
        for queue in list(self._queues):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                self._queues.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    @contextlib.contextmanager
    def subscribe(self) -> Any:
        """A queue of new events for the ``with`` block."""
        queue: asyncio.Queue[EventRecord | None] = asyncio.Queue(QUEUE_SIZE)
        if self.closed:
            queue.put_nowait(None)
        self._queues.add(queue)
        try:
            yield queue
        finally:
            self._queues.discard(queue)

    def close(self) -> None:
        """End every stream (the gateway stops)."""
        self.closed = True
        for queue in list(self._queues):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self._queues.clear()

    @property
    def watchers(self) -> int:
        """How many streams are open."""
        return len(self._queues)


def sse_frame(event: EventRecord) -> bytes:
    """One Server-Sent Events frame: ``id``, ``event`` (the kind) and JSON ``data``."""
    data = json.dumps(event.as_json(), separators=(",", ":"))
    return f"id: {event.seq}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def sse_stream(hub: EventHub, replay: Callable[[int], list[EventRecord]], after: int,
                     keep: Callable[[EventRecord], bool]) -> AsyncIterator[bytes]:
    """Replay the log after ``after``, then live events; ``keep`` filters both.

    Subscribing comes first and replayed sequence numbers are skipped when they arrive
    live, so no event is lost or sent twice between the two.
    """
    with hub.subscribe() as queue:
        yield b"retry: 1000\n\n"
        last = after
        while True:  # the log, in pages
            page = replay(last)
            for event in page:
                last = event.seq
                if keep(event):
                    yield sse_frame(event)
            if len(page) < 1000:
                break
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), PING_SECONDS)
            except TimeoutError:
                yield b": ping\n\n"
                continue
            if event is None:
                return
            if event.seq > last:
                last = event.seq
                if keep(event):
                    yield sse_frame(event)
