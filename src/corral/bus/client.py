"""The one wrapper around nats-py: connect, publish, request/reply and typed subscriptions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from corral.bus.messages import Message
from corral.bus.natsauth import NatsCredentials
from corral.bus.subjects import Subjects
from corral.errors import NodeUnreachable

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)


class Bus:
    """A NATS connection that speaks Corral's typed messages under one subject prefix.

    `credentials` (an identity and TLS trust, `corral.bus.natsauth`) are presented at every
    connect and reconnect; None connects without authentication.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "corral",
        name: str = "corral",
        credentials: NatsCredentials | None = None,
    ) -> None:
        self.url = url
        self.subjects = Subjects(prefix)
        self.name = name
        self.credentials = credentials
        self._nc: NatsClient | None = None
        self._subs: list[Subscription] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.errors = 0  # connection errors and failed publishes, requests, replies (metrics)

    @property
    def nc(self) -> NatsClient:
        if self._nc is None:
            raise RuntimeError("Bus.connect() was not called")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    @property
    def auth_required(self) -> bool:
        """Whether the server this bus is connected to makes clients authenticate (from the
        INFO it sent; nats-py keeps it in `_server_info`, with no public accessor)."""
        info: dict[str, Any] = getattr(self.nc, "_server_info", None) or {}
        return bool(info.get("auth_required"))

    async def connect(self, *, connect_timeout: float = 5.0) -> None:
        """Connect, reconnecting forever after a connection loss."""

        async def on_error(exc: Exception) -> None:
            self.errors += 1
            log.warning("NATS %s: %s", self.name, exc)

        async def on_disconnect() -> None:
            if self._closing:
                return
            self.errors += 1
            log.warning("NATS %s: disconnected", self.name)

        async def on_reconnect() -> None:
            log.info("NATS %s: reconnected", self.name)

        self._nc = await nats.connect(
            servers=[self.url],
            name=self.name,
            connect_timeout=int(max(1, connect_timeout)),
            reconnect_time_wait=1,
            max_reconnect_attempts=-1,
            allow_reconnect=True,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            **(self.credentials.connect_options(self.url) if self.credentials else {}),
        )

    async def close(self) -> None:
        """Stop subscriptions, wait for running handlers, and close the connection."""
        self._closing = True
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except nats.errors.Error:
                pass
        self._subs.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.drain()
            except (TimeoutError, nats.errors.Error):
                await self._nc.close()
        self._nc = None

    async def publish(self, subject: str, message: Message) -> None:
        """Publish a message; a lost connection is logged, not raised (events are not truth)."""
        try:
            await self.nc.publish(subject, message.model_dump_json().encode())
        except nats.errors.Error as exc:
            self.errors += 1
            log.warning("publish %s failed: %s", subject, exc)

    async def flush(self, timeout: float = 2.0) -> None:
        await self.nc.flush(timeout=int(max(1, timeout)))

    async def request(
        self, subject: str, message: Message, reply_type: type[R], *, timeout: float
    ) -> R:
        """Send a request and parse the reply.

        Raises NodeUnreachable when nobody subscribes (`no_responders=True` on the error)
        or when no reply arrives within `timeout` (`timed_out=True`).
        """
        payload = message.model_dump_json().encode()
        for attempt in range(3):
            try:
                msg = await self.nc.request(subject, payload, timeout=timeout)
                return reply_type.model_validate_json(msg.data)
            except nats.errors.NoRespondersError:
                if attempt == 2:
                    self.errors += 1
                    raise NodeUnreachable(
                        f"no responder on {subject}", no_responders=True
                    ) from None
                # a subscription made a moment ago may not have reached the server yet
                await asyncio.sleep(0.05 * (attempt + 1))
            except nats.errors.TimeoutError:
                self.errors += 1
                raise NodeUnreachable(
                    f"no reply on {subject} within {timeout:g}s", timed_out=True
                ) from None
        raise AssertionError("unreachable")

    async def subscribe(
        self,
        subject: str,
        handler: Callable[[bytes], Awaitable[None]],
        *,
        queue: str = "",
    ) -> Subscription:
        """Call `handler(payload)` for each message, one at a time, logging its exceptions."""
        return await self._subscribe(subject, lambda msg: handler(msg.data), queue=queue)

    async def subscribe_progress(
        self, subject: str, handler: Callable[[str, bytes], Awaitable[None]]
    ) -> Subscription:
        """`subscribe` for the per-node progress subjects (`Subjects.all_*_progress`): calls
        `handler(node_id, payload)` with the node id of the subject, which NATS permissions
        bind to the sender, never the one a payload claims."""
        head = f"{self.subjects.prefix}.progress."

        async def take(msg: Msg) -> None:
            node_id = msg.subject.removeprefix(head).partition(".")[0]
            if msg.subject.startswith(head) and node_id:
                await handler(node_id, msg.data)

        return await self._subscribe(subject, take)

    async def _subscribe(
        self, subject: str, handler: Callable[[Msg], Awaitable[None]], *, queue: str = ""
    ) -> Subscription:
        async def cb(msg: Msg) -> None:
            try:
                await handler(msg)
            except Exception:
                log.exception("handler for %s failed", msg.subject)

        sub = await self.nc.subscribe(subject, queue=queue, cb=cb)
        self._subs.append(sub)
        return sub

    async def serve(
        self,
        subject: str,
        request_type: type[M],
        handler: Callable[[M], Awaitable[Message | None]],
        *,
        error_reply: Callable[[str], Message | None],
        concurrent: bool = True,
    ) -> Subscription:
        """Answer requests on `subject` with `handler`'s reply (None: stay quiet, for requests
        that many subscribers see and only one should answer).

        With `concurrent`, each request runs in its own task, so a slow request never delays
        the next one on the same subject. A handler exception becomes `error_reply(text)`.
        """

        async def answer(msg: Msg) -> None:
            try:
                request = request_type.model_validate_json(msg.data)
                reply = await handler(request)
            except Exception as exc:
                log.exception("request on %s failed", msg.subject)
                reply = error_reply(f"{type(exc).__name__}: {exc}")
            if msg.reply and reply is not None:
                try:
                    await msg.respond(reply.model_dump_json().encode())
                except nats.errors.Error as exc:
                    self.errors += 1
                    log.warning("reply on %s failed: %s", msg.subject, exc)

        async def cb(msg: Msg) -> None:
            if not concurrent:
                await answer(msg)
                return
            task = asyncio.create_task(answer(msg))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        sub = await self.nc.subscribe(subject, cb=cb)
        self._subs.append(sub)
        return sub


def decode(payload: bytes, message_type: type[M]) -> M | None:
    """Parse a payload, returning None (and logging) when it does not match the type."""
    try:
        return message_type.model_validate_json(payload)
    except ValueError as exc:
        log.warning("dropping malformed %s: %s", message_type.__name__, exc)
        return None
