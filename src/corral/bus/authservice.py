"""The parts of NATS auth that talk to NATS: the auth callout responder and the worker kicker.

`AuthCallout` runs in every frontend on its frontend connection. nats-server sends each
worker's connection attempt to `$SYS.REQ.USER.AUTH`; one frontend per cluster prefix (a queue
group named after the prefix) checks the password through the `verify` callback the frontend
provides (digests in PostgreSQL) and answers with a signed user JWT or a refusal. Requests for
another prefix's workers are left to that prefix's frontends: answering them would send the
server two answers for one request.

`WorkerSessions` uses the system-account connection to close the connections made with a
revoked credential: it asks every server for the connections of the credential's session name
(`$SYS.REQ.SERVER.PING.CONNZ`) and kicks each one (`$SYS.REQ.SERVER.<id>.KICK`). Because a
connection whose callout was answered just before the revocation may finish connecting after
that first sweep, a second sweep follows once the server's auth timeout has passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from corral.bus.client import Bus
from corral.bus.natsauth import (
    AUTH_TIMEOUT,
    CORRAL_ACCOUNT,
    grant,
    parse_worker_user,
    refuse,
    session_name,
)
from corral.bus.natsjwt import AuthRequest, NatsAuthError, NKey

log = logging.getLogger(__name__)

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"

Verify = Callable[[str, str], Awaitable[str | None]]
"""`verify(node_id, secret)`: the stored digest of the node's NATS credential when `secret`
matches it (compared in constant time), else None."""


class AuthCallout:
    """Answers nats-server's auth callout for the workers of one cluster (the bus's prefix)."""

    def __init__(
        self, bus: Bus, issuer: NKey, verify: Verify, *, account: str = CORRAL_ACCOUNT
    ) -> None:
        self.bus = bus
        self.issuer = issuer
        self.verify = verify
        self.account = account
        self._sub: Subscription | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def prefix(self) -> str:
        return self.bus.subjects.prefix

    async def start(self) -> None:
        """Subscribe (queue group per prefix) and make sure the server knows it."""
        queue = f"corral-auth.{self.prefix}"
        self._sub = await self.bus.nc.subscribe(AUTH_SUBJECT, queue=queue, cb=self._on_request)
        await self.bus.flush()

    async def stop(self) -> None:
        """Stop answering and wait for the answers in progress."""
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()
            self._sub = None
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            request = AuthRequest.from_token(msg.data.decode())
        except (NatsAuthError, UnicodeDecodeError, ValueError) as exc:
            log.warning("ignoring a malformed NATS auth request: %s", exc)
            return
        answer = await self.decide(request)
        if answer is None or not msg.reply:
            return
        try:
            await msg.respond(answer.encode())
        except nats.errors.Error as exc:
            log.warning("could not answer NATS auth request for %s: %s", request.user, exc)

    async def decide(self, request: AuthRequest) -> str | None:
        """The signed answer to `request`, or None when another cluster's frontends own it."""
        parsed = parse_worker_user(request.user)
        if parsed is None or parsed[0] != self.prefix:
            return None
        node_id = parsed[1]
        try:
            digest = await self.verify(node_id, request.password)
        except Exception:
            log.exception("checking the NATS credential of node %s failed", node_id)
            return refuse(request, "credential check failed", issuer=self.issuer)
        if digest is None:
            log.warning(
                "refused NATS connection of node %s from %s: invalid credential",
                node_id,
                request.host,
            )
            return refuse(request, f"invalid credential for node {node_id}", issuer=self.issuer)
        return grant(
            request,
            prefix=self.prefix,
            node_id=node_id,
            credential_digest=digest,
            issuer=self.issuer,
            account=self.account,
        )


class WorkerSessions:
    """Finds and kicks worker connections through a system-account connection."""

    def __init__(
        self,
        bus: Bus,
        *,
        sweep_delay: float = AUTH_TIMEOUT + 1.0,
        gather_window: float = 0.25,
        timeout: float = 2.0,
    ) -> None:
        self.bus = bus
        self.sweep_delay = sweep_delay
        self.gather_window = gather_window
        self.timeout = timeout
        self._sweeps: set[asyncio.Task[None]] = set()

    async def revoke(self, node_id: str, credential_digest: str) -> int:
        """Kick every connection made with this credential now, and once more after the auth
        timeout (connections still being admitted); return how many the first sweep closed.

        The credential must already be unusable (its digest gone from PostgreSQL).
        """
        name = session_name(self.bus.subjects.prefix, node_id, credential_digest)
        kicked = await self.kick(name)
        task = asyncio.create_task(self._sweep_later(name))
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)
        return kicked

    async def close(self) -> None:
        """Cancel pending second sweeps."""
        for task in list(self._sweeps):
            task.cancel()
        if self._sweeps:
            await asyncio.gather(*self._sweeps, return_exceptions=True)

    async def kick(self, name: str) -> int:
        """Close every connection authorized as `name` on every server; return the count.

        Each server's list is acted on as it arrives, so the first kick does not wait for the
        gather window that decides no further server will answer.
        """
        kicked = 0
        try:
            async for reply in self._gather("$SYS.REQ.SERVER.PING.CONNZ", {"user": name}):
                kicked += await self._kick_listed(name, reply)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning("could not list NATS connections of %s: %s", name, exc)
        if kicked:
            log.info("kicked %d NATS connection(s) of %s", kicked, name)
        return kicked

    async def _kick_listed(self, name: str, reply: dict[str, Any]) -> int:
        """Kick the connections one server's CONNZ answer lists."""
        server_id = (reply.get("server") or {}).get("id")
        kicked = 0
        for conn in (reply.get("data") or {}).get("connections") or []:
            cid = conn.get("cid")
            if not server_id or not isinstance(cid, int):
                continue
            try:
                await self.bus.nc.request(
                    f"$SYS.REQ.SERVER.{server_id}.KICK",
                    json.dumps({"cid": cid}).encode(),
                    timeout=self.timeout,
                )
                kicked += 1
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("could not kick NATS connection %s of %s: %s", cid, name, exc)
        return kicked

    async def _sweep_later(self, name: str) -> None:
        await asyncio.sleep(self.sweep_delay)
        await self.kick(name)

    async def _gather(self, subject: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send a request every server answers and yield the answers as they come, until none
        came for the gather window (or the timeout passed); TimeoutError when none came."""
        nc = self.bus.nc
        inbox = nc.new_inbox()
        queue: asyncio.Queue[Msg] = asyncio.Queue()

        async def collect(msg: Msg) -> None:
            await queue.put(msg)

        sub = await nc.subscribe(inbox, cb=collect)
        answered = False
        try:
            await nc.publish(subject, json.dumps(body).encode(), reply=inbox)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.timeout
            while (left := deadline - loop.time()) > 0:
                wait = min(left, self.gather_window) if answered else left
                try:
                    msg = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    break
                answered = True
                try:
                    parsed = json.loads(msg.data)
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    yield parsed
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        if not answered:
            raise TimeoutError(f"no server answered {subject}")
