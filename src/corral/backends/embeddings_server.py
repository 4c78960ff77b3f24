"""OpenAI-compatible embeddings server on sentence-transformers, run in its backend's virtualenv.

Run by path (`python -P .../embeddings_server.py --port 8001 --model NAME --model-path DIR`):
it imports only the standard library and its backend's requirements (sentence-transformers,
numpy), never `corral`. Endpoints: POST /v1/embeddings, GET /v1/models, GET /health (503 while
the model loads). Inputs may be strings or token-id arrays; `encoding_format` float or base64;
`dimensions` truncates (and re-normalises with --normalize).
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
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.maximum(norms, np.float32(1e-12))
        return vectors


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
                if path != "/v1/embeddings":
                    raise RequestError(404, f"no route for {path}", code="not_found")
                if not model.loaded.is_set():
                    raise RequestError(
                        503, f"model '{model.name}' is loading", code="model_loading"
                    )
                self.send_json(200, embeddings(model, body))
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
