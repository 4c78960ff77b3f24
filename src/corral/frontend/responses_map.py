"""Where each stored response lives: a bounded map from response id to the replica that created
it (with a TTL), shared across frontends over NATS, and the scans that find a new response's id
in the bytes the proxy relays (a whole JSON body, or the `response.created` SSE event).

Engines such as vLLM keep response state in process, so a follow-up (`previous_response_id`)
or a GET/DELETE by id must reach the replica that created the response. Every frontend that
relays a new response records it and broadcasts it; a frontend that does not know an id asks the
others (only a frontend that knows answers), which also covers a follow-up sent to another
frontend before the broadcast arrived. The scans run after the bytes were handed on.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from corral.bus.client import decode
from corral.bus.messages import ResponseHomeEvent, ResponseLookup
from corral.domain.entities import Replica
from corral.errors import NodeUnreachable

if TYPE_CHECKING:
    from corral.bus.client import Bus

log = logging.getLogger(__name__)

#: Seconds a frontend waits for another to say where an unknown response lives.
LOOKUP_TIMEOUT = 0.25
#: Bytes of a stream's start searched for the `response.created` event.
SCAN_LIMIT = 64 * 1024


@dataclass(frozen=True, slots=True)
class Home:
    """The replica holding a stored response, as it was when the response was created."""

    model: str
    index: int
    address: str
    at: float  # when it was recorded (seconds since the epoch)


class ResponseHomes:
    """The newest `capacity` response homes, each for `ttl` seconds (pure, no I/O)."""

    def __init__(
        self, capacity: int, ttl: float, *, clock: Callable[[], float] = time.time
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self.clock = clock
        self._items: OrderedDict[str, Home] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, response_id: str, home: Home) -> None:
        if self.capacity <= 0 or home.at + self.ttl <= self.clock():
            return
        self._items[response_id] = home
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> Home | None:
        home = self._items.get(response_id)
        if home is not None and home.at + self.ttl <= self.clock():
            del self._items[response_id]
            return None
        return home

    def forget(self, response_id: str) -> None:
        self._items.pop(response_id, None)


class SharedHomes:
    """`ResponseHomes` shared across frontends: records are broadcast, a miss asks the others.
    Without a bus (`bus=None`) the map is this frontend's alone."""

    def __init__(self, homes: ResponseHomes, bus: Bus | None, frontend_id: str) -> None:
        self.homes = homes
        self.bus = bus
        self.frontend_id = frontend_id

    async def open(self) -> None:
        """Follow the other frontends' records and answer their lookups."""
        if self.bus is None:
            return
        s = self.bus.subjects
        await self.bus.subscribe(s.response_homes, self._on_record)
        await self.bus.serve(s.response_lookup, ResponseLookup, self._answer, error_reply=_none)

    async def record(self, response_id: str, replica: Replica) -> None:
        """`replica` created the stored response `response_id`: remember it, tell the others."""
        assert replica.address is not None
        home = Home(replica.model, replica.index, replica.address, time.time())
        self.homes.put(response_id, home)
        if self.bus is not None:
            await self.bus.publish(self.bus.subjects.response_homes, self._event(response_id, home))

    async def find(self, response_id: str) -> Home | None:
        """Where `response_id` lives: this frontend's map, else whichever frontend knows."""
        home = self.homes.get(response_id)
        if home is not None or self.bus is None:
            return home
        try:
            found = await self.bus.request(
                self.bus.subjects.response_lookup,
                ResponseLookup(id=response_id),
                ResponseHomeEvent,
                timeout=LOOKUP_TIMEOUT,
            )
        except NodeUnreachable:
            return None  # nobody knows it
        home = Home(found.model, found.index, found.address, found.at)
        self.homes.put(response_id, home)
        return self.homes.get(response_id)

    def forget(self, response_id: str) -> None:
        self.homes.forget(response_id)

    def _event(self, response_id: str, home: Home) -> ResponseHomeEvent:
        return ResponseHomeEvent(
            origin=self.frontend_id,
            id=response_id,
            model=home.model,
            index=home.index,
            address=home.address,
            at=home.at,
        )

    async def _on_record(self, payload: bytes) -> None:
        event = decode(payload, ResponseHomeEvent)
        if event is not None and event.origin != self.frontend_id:
            self.homes.put(event.id, Home(event.model, event.index, event.address, event.at))

    async def _answer(self, lookup: ResponseLookup) -> ResponseHomeEvent | None:
        home = self.homes.get(lookup.id)
        return None if home is None else self._event(lookup.id, home)  # None: stay quiet


def _none(_: str) -> None:
    return None


# --- finding a new response's id in relayed bytes ------------------------------------------


def id_of_body(body: bytes) -> str | None:
    """The id of a whole Responses API answer (a JSON response object), else None."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    return _response_id(data)


class StreamIdScanner:
    """Finds the response id in a Responses API event stream's `response.created` event (the
    first one), looking at no more than `SCAN_LIMIT` bytes of the stream's start."""

    __slots__ = ("_buf", "_seen", "done")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._seen = 0
        self.done = False

    def feed(self, chunk: bytes) -> str | None:
        """The id once it has arrived (then `done`), else None."""
        if self.done:
            return None
        self._seen += len(chunk)
        self._buf += chunk.replace(b"\r\n", b"\n")  # a CR LF split across chunks: harmless
        while True:
            end = self._buf.find(b"\n\n")
            if end < 0:
                break
            event = bytes(self._buf[:end])
            del self._buf[: end + 2]
            found = _event_id(event)
            if found is not None:
                self._stop()
                return found
        if self._seen > SCAN_LIMIT:
            self._stop()
        return None

    def _stop(self) -> None:
        self.done = True
        self._buf = bytearray()


def _event_id(event: bytes) -> str | None:
    for line in event.split(b"\n"):
        if not line.startswith(b"data:"):
            continue
        try:
            data = orjson.loads(line[5:])
        except orjson.JSONDecodeError:
            return None
        if isinstance(data, dict) and data.get("type") == "response.created":
            return _response_id(data.get("response"))
    return None


def _response_id(data: Any) -> str | None:
    if not isinstance(data, dict) or data.get("object") != "response":
        return None
    found = data.get("id")
    return found if isinstance(found, str) and found else None
