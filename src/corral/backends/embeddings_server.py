"""OpenAI-compatible embeddings server on sentence-transformers, run in its backend's virtualenv.

Run by path (`python -P .../embeddings_server.py --port 8001 --model NAME --model-path DIR`):
it imports only the standard library and its backend's requirements (sentence-transformers,
numpy), never `corral`. Endpoints: POST /v1/embeddings, GET /v1/models, GET /health (503 while
the model loads). Inputs may be strings or token-id arrays; `encoding_format` float or base64;
`dimensions` truncates (and re-normalises with --normalize).

POST /v1/rerank (also /rerank, /v2/rerank; the Cohere / Jina / vLLM shape: query, documents as
strings or {"text": ...}, top_n, return_documents) answers results sorted by relevance_score,
and POST /v1/score (also /score; vLLM's shape: text_1 and text_2, each a string or a list, one
paired with each of the other or pairwise) answers one score per pair. Both score the cosine
similarity of the texts' embeddings by the same model.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("corral.embeddings_server")

MAX_BODY = 32 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses; carries the HTTP status and OpenAI error fields."""

    def __init__(
        self, status: int, message: str, *, code: str = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


class EmbeddingModel:
    """A sentence-transformers model, loaded once, encoding one request at a time."""

    def __init__(
        self, name: str, path: str, *, device: str | None, normalize: bool, batch_size: int
    ) -> None:
        self.name = name
        self.path = path
        self.device = device
        self.normalize = normalize
        self.batch_size = batch_size
        self.loaded = threading.Event()
        self._model: Any = None
        self._np: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        st = importlib.import_module("sentence_transformers")
        self._np = importlib.import_module("numpy")
        started = time.monotonic()
        self._model = st.SentenceTransformer(self.path, device=self.device)
        log.warning(
            "loaded %s from %s on %s in %.1fs (dimension %s)",
            self.name,
            self.path,
            self._model.device,
            time.monotonic() - started,
            self.dimension,
        )
        self.loaded.set()

    @property
    def dimension(self) -> int:
        model = self._model
        getter = getattr(model, "get_embedding_dimension", None)  # newer sentence-transformers
        return int(getter() if getter else model.get_sentence_embedding_dimension())

    def decode(self, ids: list[int]) -> str:
        return str(self._model.tokenizer.decode(ids, skip_special_tokens=True))

    def count_tokens(self, texts: list[str]) -> int:
        encoded = self._model.tokenizer(texts, add_special_tokens=True, truncation=True)
        return sum(len(ids) for ids in encoded["input_ids"])

    def encode(self, texts: list[str], dimensions: int | None) -> Any:
        """float32 vectors, one row per text."""
        np = self._np
        with self._lock:
            vectors = self._model.encode(
                texts,
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=self.normalize,
                show_progress_bar=False,
            )
        vectors = np.asarray(vectors, dtype=np.float32)
        if dimensions is not None:
            vectors = vectors[:, :dimensions]
            if self.normalize:
                vectors = self._unit(vectors)
        return vectors

    def _unit(self, vectors: Any) -> Any:
        np = self._np
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.maximum(norms, np.float32(1e-12))

    def cosine(self, pairs: list[tuple[str, str]]) -> list[float]:
        """The cosine similarity of each (left, right) pair's embeddings (each text once)."""
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        vectors = self._unit(self.encode(texts, None))
        row = {text: vectors[i] for i, text in enumerate(texts)}
        return [float(row[a] @ row[b]) for a, b in pairs]


def parse_inputs(model: EmbeddingModel, value: Any) -> list[str]:
    """OpenAI's `input`: a string, strings, a token-id array, or token-id arrays."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise RequestError(400, "'input' must be a non-empty string or array", param="input")
    if all(isinstance(v, str) for v in value):
        return list(value)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [model.decode(value)]
    if all(isinstance(v, list) and all(isinstance(t, int) for t in v) for v in value):
        return [model.decode(v) for v in value]
    raise RequestError(400, "'input' items must all be strings or token arrays", param="input")


def embeddings(model: EmbeddingModel, body: Any) -> dict[str, Any]:
    """The response body of POST /v1/embeddings."""
    body = check_model(model, body)
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError(
            400, "'encoding_format' must be float or base64", param="encoding_format"
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (
        not isinstance(dimensions, int) or not 0 < dimensions <= model.dimension
    ):
        raise RequestError(
            400, f"'dimensions' must be an integer in 1..{model.dimension}", param="dimensions"
        )
    texts = parse_inputs(model, body.get("input"))
    vectors = model.encode(texts, dimensions)
    data = []
    for i, row in enumerate(vectors):
        if fmt == "base64":
            embedding: Any = base64.b64encode(row.astype("<f4").tobytes()).decode()
        else:
            embedding = row.tolist()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = model.count_tokens(texts)
    return {
        "object": "list",
        "data": data,
        "model": model.name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def check_model(model: EmbeddingModel, body: Any) -> dict[str, Any]:
    """`body` as a JSON object naming this server's model (or none)."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    requested = body.get("model")
    if requested is not None and requested != model.name:
        raise RequestError(
            404,
            f"model '{requested}' is not served here; this server serves '{model.name}'",
            code="model_not_found",
            param="model",
        )
    return body


def _text(value: Any, param: str) -> str:
    """A text input: a string or {"text": string} (Cohere's and Jina's document objects)."""
    if isinstance(value, dict):
        value = value.get("text")
    if not isinstance(value, str):
        raise RequestError(400, f"'{param}' must be a string or an object with 'text'", param=param)
    return value


def _texts(value: Any, param: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise RequestError(400, f"'{param}' must not be empty", param=param)
    return [_text(item, param) for item in items]


def rerank(model: EmbeddingModel, body: Any) -> dict[str, Any]:
    """The response body of POST /v1/rerank: documents by descending relevance to the query."""
    body = check_model(model, body)
    query = _text(body.get("query"), "query")
    documents = body.get("documents")
    if not isinstance(documents, list) or not documents:
        raise RequestError(400, "'documents' must be a non-empty array", param="documents")
    texts = [_text(d, "documents") for d in documents]
    top_n = body.get("top_n")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 0):
        raise RequestError(400, "'top_n' must be a non-negative integer", param="top_n")
    top_n = top_n or len(texts)  # none or 0 (vLLM's default): all of them
    return_documents = body.get("return_documents", True)
    if not isinstance(return_documents, bool):
        raise RequestError(400, "'return_documents' must be a boolean", param="return_documents")
    scores = model.cosine([(query, text) for text in texts])
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], i))[:top_n]
    results = []
    for i in order:
        result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if return_documents:
            result["document"] = {"text": texts[i]}
        results.append(result)
    tokens = model.count_tokens([query, *texts])
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": model.name,
        "results": results,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


#: The names vLLM accepts for the two sides of a score request.
SCORE_FIELDS = (("text_1", "text_2"), ("queries", "documents"), ("queries", "items"))


def score(model: EmbeddingModel, body: Any) -> dict[str, Any]:
    """The response body of POST /v1/score: one similarity per (text_1, text_2) pair. A single
    text on one side is paired with each text of the other; two lists pair by position."""
    body = check_model(model, body)
    for left_name, right_name in SCORE_FIELDS:
        if left_name in body and right_name in body:
            break
    else:
        raise RequestError(400, "'text_1' and 'text_2' are required", param="text_1")
    left = _texts(body[left_name], left_name)
    right = _texts(body[right_name], right_name)
    if len(left) == 1:
        pairs = [(left[0], text) for text in right]
    elif len(right) == 1:
        pairs = [(text, right[0]) for text in left]
    elif len(left) == len(right):
        pairs = list(zip(left, right, strict=True))
    else:
        raise RequestError(
            400,
            f"'{left_name}' and '{right_name}' must have the same length, or one of them one item",
            param=right_name,
        )
    scores = model.cosine(pairs)
    tokens = model.count_tokens([t for pair in pairs for t in pair])
    return {
        "id": f"score-{uuid.uuid4().hex}",
        "object": "list",
        "created": int(time.time()),
        "model": model.name,
        "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


#: POST paths and the function answering each.
ROUTES: dict[str, Callable[[EmbeddingModel, Any], dict[str, Any]]] = {
    "/v1/embeddings": embeddings,
    "/v1/rerank": rerank,
    "/rerank": rerank,
    "/v2/rerank": rerank,
    "/v1/score": score,
    "/score": score,
}


def make_handler(model: EmbeddingModel) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "corral-embeddings"

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                if model.loaded.is_set():
                    self.send_json(200, {"status": "ok"})
                else:
                    self.send_json(503, {"status": "loading"}, {"Retry-After": "1"})
            elif path == "/v1/models":
                data = [{"id": model.name, "object": "model", "created": 0, "owned_by": "corral"}]
                self.send_json(200, {"object": "list", "data": data})
            else:
                self.send_error_json(RequestError(404, f"no route for {path}", code="not_found"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            try:
                body = self.read_json()
                answer = ROUTES.get(path)
                if answer is None:
                    raise RequestError(404, f"no route for {path}", code="not_found")
                if not model.loaded.is_set():
                    raise RequestError(
                        503, f"model '{model.name}' is loading", code="model_loading"
                    )
                self.send_json(200, answer(model, body))
            except RequestError as e:
                self.send_error_json(e)
            except Exception:
                log.exception("embeddings request failed")
                self.send_error_json(RequestError(500, "internal error", code="server_error"))

        def read_json(self) -> Any:
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                self.close_connection = True
                raise RequestError(411, "Content-Length required")
            if int(length) > MAX_BODY:
                self.close_connection = True
                raise RequestError(413, f"request body exceeds {MAX_BODY} bytes")
            raw = self.rfile.read(int(length))
            try:
                return json.loads(raw)
            except ValueError as e:
                raise RequestError(400, f"request body is not valid JSON: {e}") from None

        def send_json(
            self, status: int, payload: Any, headers: dict[str, str] | None = None
        ) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def send_error_json(self, e: RequestError) -> None:
            self.send_json(e.status, e.body())

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s " + format, self.address_string(), *args)

    return Handler


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible sentence-transformers server")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--model", required=True, help="the model name clients ask for")
    parser.add_argument(
        "--model-path", required=True, help="a model directory or a sentence-transformers name"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: auto)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr)
    model = EmbeddingModel(
        args.model,
        args.model_path,
        device=args.device,
        normalize=args.normalize,
        batch_size=args.batch_size,
    )
    server = ThreadingHTTPServer((args.host, args.port), make_handler(model))
    server.daemon_threads = True
    port = server.server_address[1]
    print(f"embeddings server listening on http://{args.host}:{port}", file=sys.stderr, flush=True)

    def load() -> None:
        try:
            model.load()
        except BaseException:
            traceback.print_exc()
            print(f"cannot load model from {args.model_path}", file=sys.stderr, flush=True)
            os._exit(1)

    threading.Thread(target=load, name="load", daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
