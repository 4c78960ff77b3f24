"""SimServer: the simulator's routes and state, over the HTTP layer in protocol.py.

Every OpenAI-compatible endpoint a backend may serve is here, deterministic (the same request
gives the same answer): chat, completions, embeddings, responses (with a bounded store for
`previous_response_id`, GET and DELETE), rerank, score, moderations, tokenize, audio and
images; plus /health, /metrics (vLLM's gauge names) and the /admin switches and stats.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import orjson

from corral.backends.sim import extras, media
from corral.backends.sim.answers import Answers, engine_params
from corral.backends.sim.config import SimConfig
from corral.backends.sim.engine import (
    Generation,
    Prompt,
    SimEngine,
    StreamEvents,
    chat_prompt,
    completion_prompt,
    count_words,
    embedding_inputs,
    include_usage,
    max_tokens,
    render_chat,
)
from corral.backends.sim.metrics import CONTENT_TYPE as METRICS_TYPE
from corral.backends.sim.metrics import prometheus
from corral.backends.sim.multipart import Form
from corral.backends.sim.protocol import CRLF, Heads, HttpConnection, Reply, Request
from corral.backends.sim.responses import (
    ResponseStore,
    StoredResponse,
    deleted,
    draft,
    not_found,
    parse_request,
    prompt_text,
    response_object,
    stream_events,
)
from corral.backends.sim.scheduler import EngineModel, EngineRequest, count_tokens
from corral.errors import (
    BadRequest,
    CorralError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    Unavailable,
)

log = logging.getLogger(__name__)

Handler = Callable[[Request, HttpConnection], Reply]

_CLOSE_GRACE = 2.0  # seconds stop() lets connections flush before aborting them
_GET = b"GET"
_POST = b"POST"
_DELETE = b"DELETE"
_RESPONSE_PATH = b"/v1/responses/"


class MethodNotAllowed(CorralError):
    """The path exists but not for this HTTP method (HTTP 405)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelLoading(Unavailable):
    """The model is still loading (`--load-time`); retry shortly (HTTP 503)."""

    code = "model_loading"


class SimServer:
    """The simulator backend: binds at `start()`, serves until `stop()`."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._engine = SimEngine(config)
        self._heads = Heads.for_fingerprint(config.system_fingerprint)
        model = EngineModel(engine_params(config)) if config.engine_model else None
        self._answers = Answers(config, self._heads, model)
        self._store = ResponseStore(config.stored_responses)
        self._loaded = not config.unloaded  # the admin switch
        self._loading = False  # True during --load-time
        self._server: asyncio.Server | None = None
        self._load_timer: asyncio.TimerHandle | None = None
        self._connections: set[HttpConnection] = set()
        self._all_closed: asyncio.Event | None = None  # set by stop(), fired when none is left
        self._ids: itertools.count[int] = itertools.count(1)
        self._id_prefix = ""
        post = {
            b"/v1/chat/completions": self._chat,
            b"/v1/completions": self._completions,
            b"/v1/embeddings": self._embeddings,
            b"/v1/responses": self._responses,
            b"/v1/rerank": self._rerank,
            b"/rerank": self._rerank,
            b"/v2/rerank": self._rerank,
            b"/v1/score": self._score,
            b"/score": self._score,
            b"/v1/moderations": self._moderations,
            b"/tokenize": self._tokenize,
            b"/detokenize": self._detokenize,
            b"/v1/audio/transcriptions": self._transcriptions,
            b"/v1/audio/translations": self._translations,
            b"/v1/audio/speech": self._speech,
            b"/v1/images/generations": self._image_generations,
            b"/v1/images/edits": self._image_edits,
            b"/admin/load": self._admin_load,
            b"/admin/unload": self._admin_unload,
            b"/admin/reset-peak": self._admin_reset_peak,
        }
        get = {
            b"/health": self._health,
            b"/v1/models": self._models,
            b"/metrics": self._metrics,
            b"/admin/stats": self._admin_stats,
        }
        self._routes: dict[bytes, tuple[bytes, Handler]] = {
            **{path: (_POST, h) for path, h in post.items()},
            **{path: (_GET, h) for path, h in get.items()},
        }

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> int:
        """Bind and start serving; return the bound port (useful with port 0)."""
        if self._server is not None:
            raise RuntimeError("SimServer already started")
        self.config.validate()
        loop = asyncio.get_running_loop()
        self._id_prefix = os.urandom(6).hex()
        if self.config.load_time > 0:
            self._loading = True
            self._load_timer = loop.call_later(self.config.load_time, self._finish_loading)
        try:
            self._server = await loop.create_server(
                lambda: HttpConnection(self),
                self.config.host,
                self.config.port,
                backlog=2048,
                reuse_address=True,
            )
        except BaseException:
            if self._load_timer is not None:
                self._load_timer.cancel()
                self._load_timer = None
            raise
        return self.port

    @property
    def port(self) -> int:
        """The bound port (of the first socket, when the host resolved to several)."""
        if self._server is None:
            raise RuntimeError("SimServer not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """Base URL of the server, e.g. http://127.0.0.1:8001."""
        host = self.config.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def max_body(self) -> int:
        return self.config.max_body

    async def stop(self) -> None:
        """Stop listening, close every connection, and wait for their tasks and sockets."""
        if self._load_timer is not None:
            self._load_timer.cancel()
            self._load_timer = None
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        self._all_closed = asyncio.Event()
        conns = list(self._connections)
        tasks = [t for c in conns if (t := c.shutdown()) is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._answers.stop()
        if self._connections:
            try:
                await asyncio.wait_for(self._all_closed.wait(), _CLOSE_GRACE)
            except TimeoutError:  # a client that does not read: drop it
                for conn in list(self._connections):
                    conn.abort()
        await server.wait_closed()

    def stats(self) -> dict[str, Any]:
        """What `GET /admin/stats` answers: model state, request and concurrency counters
        (`peak_inflight` since start or the last reset-peak), and the engine model's figures
        (`engine`, null when it is off)."""
        a = self._answers
        engine = a.engine_stats()
        return {
            "model": self.config.model,
            "loaded": self._loaded and not self._loading,
            "loading": self._loading,
            "requests": a.requests,
            "inflight": a.inflight,
            "peak_inflight": a.peak,
            "fingerprint": self._engine.fingerprint,
            "engine": None if engine is None else engine.as_dict(),
        }

    @property
    def open_connections(self) -> int:
        """Client connections currently open."""
        return len(self._connections)

    def _finish_loading(self) -> None:
        self._loading = False
        self._load_timer = None

    def connection_opened(self, conn: HttpConnection) -> None:
        self._connections.add(conn)

    def connection_closed(self, conn: HttpConnection) -> None:
        self._connections.discard(conn)
        if not self._connections and self._all_closed is not None:
            self._all_closed.set()

    # --- dispatch --------------------------------------------------------------------------

    def respond(self, req: Request, conn: HttpConnection) -> Reply:
        """The answer to one request: response bytes, or a coroutine that writes it later."""
        try:
            if req.parse_error:
                raise BadRequest("malformed HTTP request")
            route = self._routes.get(req.path)
            if route is None:
                if req.path.startswith(_RESPONSE_PATH):
                    return self._response_by_id(req)
                raise NotFound(f"no route for {req.path.decode('latin-1')}")
            method, handler = route
            if req.method != method:
                raise MethodNotAllowed(
                    f"{req.method.decode('latin-1')} is not allowed on "
                    f"{req.path.decode('latin-1')}; use {method.decode()}",
                    allow=method,
                )
            if req.too_large:
                raise PayloadTooLarge(f"request body exceeds {self.config.max_body} bytes")
            return handler(req, conn)
        except CorralError as exc:
            return self._error(exc, req.conn)
        except Exception:
            log.exception("sim: unexpected error answering %r", req.path)
            return self._error(CorralError("internal error in the simulator"), req.conn)

    def _error(self, exc: CorralError, conn: bytes) -> bytes:
        body = orjson.dumps(
            {
                "error": {
                    "message": exc.message,
                    "type": exc.type,
                    "param": exc.extra.get("param"),
                    "code": exc.code,
                }
            }
        )
        extra = b""
        allow = exc.extra.get("allow")
        if isinstance(allow, bytes):
            extra = b"allow: " + allow + CRLF
        if exc.retry_after is not None:
            extra += b"retry-after: %d\r\n" % max(1, round(exc.retry_after))
        return self._heads.json_status(exc.status, body, conn, extra)

    # --- plain endpoints -------------------------------------------------------------------

    def _health(self, req: Request, conn: HttpConnection) -> Reply:
        if self._loading:
            return self._heads.json_status(
                503, b'{"status":"loading"}', req.conn, b"retry-after: 1\r\n"
            )
        return self._heads.ok_json(b'{"status":"ok"}', req.conn)

    def _models(self, req: Request, conn: HttpConnection) -> Reply:
        data: list[dict[str, Any]] = []
        if self._loaded and not self._loading:
            data.append(
                {
                    "id": self.config.model,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "corral-sim",
                }
            )
        return self._heads.ok_json(orjson.dumps({"object": "list", "data": data}), req.conn)

    def _metrics(self, req: Request, conn: HttpConnection) -> Reply:
        a = self._answers
        engine = a.engine_stats()
        body = prometheus(
            self.config.model,
            running=a.inflight if engine is None else engine.running,
            waiting=0 if engine is None else engine.waiting,
            kv_cache_usage=0.0 if engine is None else engine.kv_cache_usage,
            prefix_queries=0 if engine is None else engine.prefix_cache_queries,
            prefix_hits=0 if engine is None else engine.prefix_cache_hits,
            requests=a.requests,
        )
        return self._heads.ok(METRICS_TYPE, body, req.conn)

    def _stats(self, req: Request) -> bytes:
        return self._heads.ok_json(orjson.dumps(self.stats()), req.conn)

    def _admin_load(self, req: Request, conn: HttpConnection) -> Reply:
        self._loaded = True
        return self._stats(req)

    def _admin_unload(self, req: Request, conn: HttpConnection) -> Reply:
        self._loaded = False
        return self._stats(req)

    def _admin_stats(self, req: Request, conn: HttpConnection) -> Reply:
        return self._stats(req)

    def _admin_reset_peak(self, req: Request, conn: HttpConnection) -> Reply:
        self._answers.reset_peak()
        return self._stats(req)

    # --- request checks --------------------------------------------------------------------

    def _check_ready(self) -> None:
        if self._loading:
            raise ModelLoading(f"model '{self.config.model}' is loading", retry_after=1)

    def _check_model(self, requested: object) -> None:
        model = self.config.model
        if requested is not None and not isinstance(requested, str):
            raise BadRequest("'model' must be a string", param="model")
        if not self._loaded:
            raise ModelNotFound(f"model '{model}' is not loaded", param="model")
        if requested is not None and requested != model:
            raise ModelNotFound(
                f"model '{requested}' is not served here; this server serves '{model}'",
                param="model",
            )

    def _inference_body(self, req: Request) -> dict[str, Any]:
        """The JSON body of an inference request, after the checks every endpoint shares."""
        self._check_ready()
        try:
            body = orjson.loads(req.body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        self._check_model(body.get("model"))
        stream = body.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise BadRequest("'stream' must be a boolean", param="stream")
        return body

    def _form(self, req: Request) -> Form:
        """The multipart form of an upload request, after the same checks."""
        self._check_ready()
        form = Form.parse(req.body, req.ctype)
        self._check_model(form.text("model"))
        return form

    def _next_id(self, prefix: str) -> str:
        return f"{prefix}{self._id_prefix}{next(self._ids):x}"

    # --- generation ------------------------------------------------------------------------

    def _chat(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        gen = self._engine.generate(chat_prompt(body), max_tokens(body))
        rid = self._next_id("chatcmpl-")
        created = int(time.time())
        engine = self._engine
        if self._answers.model is not None:
            usage = include_usage(body)
            return self._engine_answer(
                render_chat(body),
                gen,
                bool(body.get("stream")),
                lambda g: engine.chat_completion(rid, created, g),
                lambda g: engine.chat_events(rid, created, g, with_usage=usage),
                req,
                conn,
            )
        if body.get("stream"):
            events = engine.chat_events(rid, created, gen, with_usage=include_usage(body))
            return self._answers.stream(events, req.conn, conn)
        payload = engine.chat_completion(rid, created, gen)
        return self._answers.whole(payload, gen.completion_tokens, req.conn, conn)

    def _completions(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        prompt = completion_prompt(body)
        gen = self._engine.generate(prompt, max_tokens(body))
        rid = self._next_id("cmpl-")
        created = int(time.time())
        engine = self._engine
        if self._answers.model is not None:
            usage = include_usage(body)
            return self._engine_answer(
                prompt.text.encode("utf-8", "surrogatepass"),
                gen,
                bool(body.get("stream")),
                lambda g: engine.text_completion(rid, created, g),
                lambda g: engine.completion_events(rid, created, g, with_usage=usage),
                req,
                conn,
            )
        if body.get("stream"):
            events = engine.completion_events(rid, created, gen, with_usage=include_usage(body))
            return self._answers.stream(events, req.conn, conn)
        payload = engine.text_completion(rid, created, gen)
        return self._answers.whole(payload, gen.completion_tokens, req.conn, conn)

    def _engine_answer(
        self,
        prompt: bytes,
        gen: Generation,
        stream: bool,
        whole: Callable[[Generation], bytes],
        events: Callable[[Generation], StreamEvents],
        req: Request,
        conn: HttpConnection,
    ) -> Reply:
        """A generation through the engine model; usage counts its tokens and cache hits."""

        def counted(r: EngineRequest) -> Generation:
            return gen._replace(prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens)

        answers, n = self._answers, gen.completion_tokens
        if stream:
            return answers.engine_stream(prompt, n, lambda r: events(counted(r)), req.conn, conn)
        return answers.engine_whole(prompt, n, lambda r: whole(counted(r)), req.conn, conn)

    def _embeddings(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        payload = self._engine.embeddings(body)
        if self._answers.model is not None:  # a prefill without output tokens
            text = "\n".join(p.text for p in embedding_inputs(body))
            prompt = text.encode("utf-8", "surrogatepass")
            return self._answers.engine_whole(prompt, 0, lambda r: payload, req.conn, conn)
        return self._answers.whole(payload, 0, req.conn, conn)

    def _responses(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        request = parse_request(body)
        previous = None
        if request.previous_response_id is not None:
            previous = self._store.get(request.previous_response_id)
            if previous is None:
                raise not_found(request.previous_response_id, "previous_response_id")
        text = prompt_text(request, previous)
        gen = self._engine.generate(Prompt(text, count_words(text)), request.max_output_tokens)
        rid = self._next_id("resp_")
        prompt = text.encode("utf-8", "surrogatepass")
        engine = self._answers.model is not None
        used = count_tokens(prompt) if engine else count_words(text)
        d = draft(rid, int(time.time()), self.config.model, request, previous, gen, used)

        def finished(cached: int) -> dict[str, Any]:
            obj = response_object(d, done=True, cached=cached)
            if request.store:
                self._store.put(rid, StoredResponse(obj, d.context))
            return obj

        def whole(r: EngineRequest) -> bytes:
            return orjson.dumps(finished(r.cached_tokens))

        def events(r: EngineRequest) -> StreamEvents:
            return stream_events(d, finished(r.cached_tokens))

        answers, n = self._answers, len(d.deltas)
        if engine and request.stream:
            return answers.engine_stream(prompt, n, events, req.conn, conn)
        if engine:
            return answers.engine_whole(prompt, n, whole, req.conn, conn)
        if request.stream:
            return answers.stream(stream_events(d, finished(0)), req.conn, conn)
        return answers.whole(orjson.dumps(finished(0)), n, req.conn, conn)

    def _response_by_id(self, req: Request) -> Reply:
        """GET or DELETE /v1/responses/{id}."""
        rid = req.path[len(_RESPONSE_PATH) :].decode("utf-8", "replace")
        if not rid or "/" in rid:
            raise NotFound(f"no route for {req.path.decode('latin-1')}")
        if req.method == _GET:
            stored = self._store.get(rid)
            if stored is None:
                raise not_found(rid, "response_id")
            return self._heads.ok_json(orjson.dumps(stored.body), req.conn)
        if req.method == _DELETE:
            if not self._store.delete(rid):
                raise not_found(rid, "response_id")
            return self._heads.ok_json(deleted(rid), req.conn)
        raise MethodNotAllowed(
            f"{req.method.decode('latin-1')} is not allowed on a response; use GET or DELETE",
            allow=b"GET, DELETE",
        )

    # --- scoring, moderation, tokens -------------------------------------------------------

    def _rerank(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        payload = extras.rerank(body, self.config.model, self._next_id("rerank-"))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _score(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        rid = self._next_id("score-")
        payload = extras.score(body, self.config.model, rid, int(time.time()))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _moderations(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        payload = extras.moderations(body, self.config.model, self._next_id("modr-"))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _tokenize(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        return self._heads.ok_json(extras.tokenize(body, self.config.max_model_len), req.conn)

    def _detokenize(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        return self._heads.ok_json(extras.detokenize(body), req.conn)

    # --- audio and images ------------------------------------------------------------------

    def _transcriptions(self, req: Request, conn: HttpConnection) -> Reply:
        payload, content_type = media.transcription(self._form(req), "transcribe")
        return self._answers.whole(payload, 0, req.conn, conn, content_type)

    def _translations(self, req: Request, conn: HttpConnection) -> Reply:
        payload, content_type = media.transcription(self._form(req), "translate")
        return self._answers.whole(payload, 0, req.conn, conn, content_type)

    def _speech(self, req: Request, conn: HttpConnection) -> Reply:
        speech = media.speech(self._inference_body(req))
        return self._answers.stream(speech.events, req.conn, conn, speech.content_type)

    def _image_generations(self, req: Request, conn: HttpConnection) -> Reply:
        payload = media.generations(self._inference_body(req), int(time.time()))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _image_edits(self, req: Request, conn: HttpConnection) -> Reply:
        payload = media.edits(self._form(req), int(time.time()))
        return self._answers.whole(payload, 0, req.conn, conn)


async def serve(config: SimConfig) -> None:
    """Run a SimServer until SIGTERM or SIGINT; print the listening line once bound."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:  # before the line is printed: a supervisor may signal right after it
        loop.add_signal_handler(sig, stopped.set)
    server = SimServer(config)
    try:
        await server.start()
        print(f"sim listening on {server.url}", flush=True)
        await stopped.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await server.stop()
        print(f"sim stopped: requests={server.stats()['requests']}", flush=True)


def run(config: SimConfig) -> None:
    """The CLI entry: serve `config` on uvloop when it is installed, else on asyncio's loop."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(config))
