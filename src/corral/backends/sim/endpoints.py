"""Endpoints: the simulator's inference routes and the checks they share.

Chat, completions, embeddings and responses generate text (through the fixed timings or the
engine model, see answers.py); rerank, score, moderations, tokenize, audio and images answer
from pure functions (extras.py, media.py). Every body is checked the same way first: the
model is not loading, the body parses, `model` names the served model.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from typing import Any

import orjson

from corral.backends.sim import extras, media
from corral.backends.sim.answers import Answers
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
from corral.backends.sim.multipart import Form
from corral.backends.sim.protocol import Heads, HttpConnection, Reply, Request
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
from corral.backends.sim.scheduler import EngineRequest, count_tokens
from corral.errors import BadRequest, CorralError, ModelNotFound, NotFound, Unavailable

Handler = Callable[[Request, HttpConnection], Reply]

_GET = b"GET"
_DELETE = b"DELETE"
RESPONSE_PATH = b"/v1/responses/"


class MethodNotAllowed(CorralError):
    """The path exists but not for this HTTP method (HTTP 405)."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelLoading(Unavailable):
    """The model is still loading (`--load-time`); retry shortly (HTTP 503)."""

    code = "model_loading"


class ModelState:
    """The served model's switches, shared by the server and its endpoints."""

    __slots__ = ("loaded", "loading")

    def __init__(self, loaded: bool) -> None:
        self.loaded = loaded  # the admin switch
        self.loading = False  # True during --load-time


class Endpoints:
    """The inference endpoints of one server."""

    def __init__(
        self,
        config: SimConfig,
        state: ModelState,
        engine: SimEngine,
        answers: Answers,
        heads: Heads,
    ) -> None:
        self._config = config
        self._state = state
        self._engine = engine
        self._answers = answers
        self._heads = heads
        self._store = ResponseStore(config.stored_responses)
        self._ids: itertools.count[int] = itertools.count(1)
        self._id_prefix = ""

    def start(self) -> None:
        """Pick this run's id prefix, so ids differ between restarts."""
        self._id_prefix = os.urandom(6).hex()

    def routes(self) -> dict[bytes, Handler]:
        """POST path -> handler."""
        return {
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
        }

    # --- request checks --------------------------------------------------------------------

    def _check_ready(self) -> None:
        if self._state.loading:
            raise ModelLoading(f"model '{self._config.model}' is loading", retry_after=1)

    def _check_model(self, requested: object) -> None:
        model = self._config.model
        if requested is not None and not isinstance(requested, str):
            raise BadRequest("'model' must be a string", param="model")
        if not self._state.loaded:
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
        rid, created, engine = self._next_id("chatcmpl-"), int(time.time()), self._engine
        answers = self._answers
        if answers.model is None:  # the fast path: no closures
            if body.get("stream"):
                events = engine.chat_events(rid, created, gen, with_usage=include_usage(body))
                return answers.stream(events, req.conn, conn)
            payload = engine.chat_completion(rid, created, gen)
            return answers.whole(payload, gen.completion_tokens, req.conn, conn)
        return self._through_engine(
            body,
            gen,
            render_chat(body),
            lambda g: engine.chat_completion(rid, created, g),
            lambda g: engine.chat_events(rid, created, g, with_usage=include_usage(body)),
            req,
            conn,
        )

    def _completions(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        prompt = completion_prompt(body)
        gen = self._engine.generate(prompt, max_tokens(body))
        rid, created, engine = self._next_id("cmpl-"), int(time.time()), self._engine
        answers = self._answers
        if answers.model is None:
            if body.get("stream"):
                events = engine.completion_events(rid, created, gen, with_usage=include_usage(body))
                return answers.stream(events, req.conn, conn)
            payload = engine.text_completion(rid, created, gen)
            return answers.whole(payload, gen.completion_tokens, req.conn, conn)
        return self._through_engine(
            body,
            gen,
            prompt.text.encode("utf-8", "surrogatepass"),
            lambda g: engine.text_completion(rid, created, g),
            lambda g: engine.completion_events(rid, created, g, with_usage=include_usage(body)),
            req,
            conn,
        )

    def _through_engine(
        self,
        body: dict[str, Any],
        gen: Generation,
        prompt: bytes,
        whole: Callable[[Generation], bytes],
        events: Callable[[Generation], StreamEvents],
        req: Request,
        conn: HttpConnection,
    ) -> Reply:
        """A text answer through the engine model, which sees the rendered `prompt`; its usage
        counts the engine's tokens and cache hits."""

        def counted(r: EngineRequest) -> Generation:
            return gen._replace(prompt_tokens=r.prompt_tokens, cached_tokens=r.cached_tokens)

        answers, n = self._answers, gen.completion_tokens
        if body.get("stream"):
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
        d = draft(rid, int(time.time()), self._config.model, request, previous, gen, used)

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

    def response_by_id(self, req: Request) -> Reply:
        """GET or DELETE /v1/responses/{id}."""
        rid = req.path[len(RESPONSE_PATH) :].decode("utf-8", "replace")
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
        payload = extras.rerank(body, self._config.model, self._next_id("rerank-"))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _score(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        rid = self._next_id("score-")
        payload = extras.score(body, self._config.model, rid, int(time.time()))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _moderations(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        payload = extras.moderations(body, self._config.model, self._next_id("modr-"))
        return self._answers.whole(payload, 0, req.conn, conn)

    def _tokenize(self, req: Request, conn: HttpConnection) -> Reply:
        body = self._inference_body(req)
        return self._heads.ok_json(extras.tokenize(body, self._config.max_model_len), req.conn)

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
