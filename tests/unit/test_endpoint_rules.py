"""The endpoint table, reading what routing needs, the response-home map and the id scans,
and the proxy's answer rules (whole or streamed, self-heal or the backend's own 404)."""

from __future__ import annotations

import orjson
import pytest

from corral.backends.capabilities import PATHS, capability_for_path
from corral.errors import BadRequest
from corral.frontend.proxy import WHOLE_LIMIT, _lost_model
from corral.frontend.request import (
    ENDPOINTS,
    FORMS,
    REQUIRED,
    ParsedRequest,
    endpoint_for,
    parse_request,
    response_id_of,
)
from corral.frontend.responses_map import (
    SCAN_LIMIT,
    Home,
    ResponseHomes,
    StreamIdScanner,
    id_of_body,
)
from corral.frontend.upstream import UpstreamPool, UpstreamResponse, _Connection

# --- the table ----------------------------------------------------------------------------


def test_every_capability_path_is_an_endpoint_with_the_same_capability() -> None:
    assert {p.decode() for p in ENDPOINTS} == set(PATHS)
    for path, endpoint in ENDPOINTS.items():
        assert endpoint.capability == capability_for_path(path.decode())
        assert endpoint.methods == {b"POST"} and not endpoint.by_id
    assert set(REQUIRED) <= set(PATHS)
    assert FORMS.issubset(PATHS)


ROUTES = [
    # path, capability, body kind, required field, by id
    (b"/v1/chat/completions", "chat", "json", "messages", False),
    (b"/v1/responses", "responses", "json", "input", False),
    (b"/v1/responses/resp_1", "responses", "none", None, True),
    (b"/v1/responses/resp_1/input_items", "responses", "none", None, True),
    (b"/v1/rerank", "rerank", "json", "query", False),
    (b"/v2/rerank", "rerank", "json", "query", False),
    (b"/score", "score", "json", None, False),
    (b"/v1/audio/transcriptions", "transcription", "multipart", None, False),
    (b"/v1/audio/translations", "transcription", "multipart", None, False),
    (b"/v1/audio/speech", "speech", "json", "input", False),
    (b"/v1/images/generations", "images", "json", "prompt", False),
    (b"/v1/images/edits", "images", "multipart", None, False),
    (b"/v1/moderations", "moderations", "json", "input", False),
    (b"/tokenize", "tokenize", "json", None, False),
    (b"/detokenize", "tokenize", "json", None, False),
]


@pytest.mark.parametrize(("path", "capability", "body", "required", "by_id"), ROUTES)
def test_endpoint_for(
    path: bytes, capability: str, body: str, required: str | None, by_id: bool
) -> None:
    endpoint = endpoint_for(path)
    assert endpoint is not None
    assert (endpoint.capability, endpoint.body, endpoint.required, endpoint.by_id) == (
        capability,
        body,
        required,
        by_id,
    )
    assert endpoint.records_ids == (capability == "responses" and not by_id)
    if by_id:
        assert endpoint.methods == {b"GET", b"DELETE", b"POST"}


@pytest.mark.parametrize(
    "path", [b"/v1/models", b"/v1/responses/", b"/v1/other", b"/health", b"/v1/chat"]
)
def test_paths_corral_does_not_forward(path: bytes) -> None:
    assert endpoint_for(path) is None


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/v1/responses/resp_1", "resp_1"),
        (b"/v1/responses/resp_1/cancel", "resp_1"),
        (b"/v1/responses/resp_%C3%A9/input_items", "resp_%C3%A9"),
    ],
)
def test_response_id_of_the_path(path: bytes, expected: str) -> None:
    endpoint = endpoint_for(path)
    assert endpoint is not None
    assert response_id_of(path, endpoint) == expected


def test_a_by_id_path_without_an_id_is_refused() -> None:
    endpoint = endpoint_for(b"/v1/responses/x")
    assert endpoint is not None
    with pytest.raises(BadRequest):
        response_id_of(b"/v1/responses//cancel", endpoint)


# --- JSON bodies ----------------------------------------------------------------------------


def test_a_follow_up_names_its_previous_response() -> None:
    body = b'{"model":"m","input":"hi","previous_response_id":"resp_9","stream":true}'
    parsed = parse_request(b"/v1/responses", body)
    assert (parsed.model, parsed.stream, parsed.previous_id) == ("m", True, "resp_9")
    assert parsed.body is body


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (b"/v1/responses", b'{"model":"m"}', "input"),
        (b"/v1/responses", b'{"model":"m","input":"x","previous_response_id":3}', None),
        (b"/v1/responses", b'{"model":"m","input":"x","previous_response_id":""}', None),
        (b"/v1/rerank", b'{"model":"m","documents":["a"]}', "query"),
        (b"/v1/audio/speech", b'{"model":"m","voice":"alloy"}', "input"),
        (b"/v1/images/generations", b'{"model":"m"}', "prompt"),
        (b"/v1/moderations", b'{"model":"m"}', "input"),
    ],
)
def test_json_bodies_missing_what_the_endpoint_needs(
    path: bytes, body: bytes, param: str | None
) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_request(path, body)
    assert caught.value.extra["param"] == (param or "previous_response_id")


def test_previous_response_id_is_only_read_on_the_responses_endpoint() -> None:
    parsed = parse_request(
        b"/v1/chat/completions", b'{"model":"m","messages":[],"previous_response_id":3}'
    )
    assert parsed.previous_id is None


def test_upstream_headers_follow_the_body_kind() -> None:
    def forwarded() -> list[tuple[bytes, bytes]]:
        return [(b"accept", b"*/*"), (b"x-request-id", b"r1")]

    json_request = parse_request(b"/v1/chat/completions", b'{"model":"m","messages":[]}')
    assert json_request.headers(forwarded()) == [
        *forwarded(),
        (b"content-type", b"application/json"),
    ]
    form = endpoint_for(b"/v1/audio/transcriptions")
    upload = ParsedRequest(b"/v1/audio/transcriptions", b"", "m", False, form)
    upload.content_type = b"multipart/form-data; boundary=xyz"
    assert upload.headers(forwarded())[-1] == (
        b"content-type",
        b"multipart/form-data; boundary=xyz",
    )
    by_id = ParsedRequest(b"/v1/responses/r", b"", "", False, endpoint_for(b"/v1/responses/r"))
    assert by_id.headers(forwarded()) == forwarded()


# --- response homes -----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def home(at: float, index: int = 0) -> Home:
    return Home("m", index, f"127.0.0.1:{9000 + index}", at)


def test_homes_expire_after_their_ttl() -> None:
    clock = Clock()
    homes = ResponseHomes(10, 60.0, clock=clock)
    homes.put("a", home(clock.now))
    homes.put("old", home(clock.now - 61))  # recorded elsewhere long ago: not kept
    assert homes.get("a") == home(1000.0) and homes.get("old") is None
    clock.now += 59.9
    assert homes.get("a") is not None
    clock.now += 0.2
    assert homes.get("a") is None and len(homes) == 0


def test_homes_keep_the_newest_within_capacity() -> None:
    clock = Clock()
    homes = ResponseHomes(3, 60.0, clock=clock)
    for i, rid in enumerate("abcd"):
        homes.put(rid, home(clock.now, i))
    assert [homes.get(r) is not None for r in "abcd"] == [False, True, True, True]
    homes.put("b", home(clock.now, 7))  # recorded again: now the newest
    homes.put("e", home(clock.now, 5))
    assert homes.get("c") is None and homes.get("b") == home(clock.now, 7)
    homes.forget("b")
    assert homes.get("b") is None and len(homes) == 2


def test_no_capacity_remembers_nothing() -> None:
    homes = ResponseHomes(0, 60.0)
    homes.put("a", home(1e12))
    assert homes.get("a") is None


# --- finding the id in relayed bytes --------------------------------------------------------


def created(rid: str, crlf: bool = False) -> bytes:
    data = {"type": "response.created", "response": {"id": rid, "object": "response"}}
    sep = b"\r\n" if crlf else b"\n"
    return b"event: response.created" + sep + b"data: " + orjson.dumps(data) + sep + sep


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("piece", [1, 7, 10_000])
def test_stream_scanner_finds_the_id_in_any_split(crlf: bool, piece: int) -> None:
    stream = b": keep-alive\n\n" + created("resp_42", crlf) + b"data: more\n\n"
    scanner = StreamIdScanner()
    found = [scanner.feed(stream[i : i + piece]) for i in range(0, len(stream), piece)]
    assert [f for f in found if f] == ["resp_42"]
    assert scanner.done


def test_stream_scanner_gives_up_past_its_limit() -> None:
    scanner = StreamIdScanner()
    assert scanner.feed(b"data: {" + b"x" * SCAN_LIMIT) is None
    assert scanner.done
    assert scanner.feed(created("resp_late")) is None  # no longer looking


def test_stream_scanner_ignores_other_events() -> None:
    other = b'data: {"type":"response.in_progress","response":{"id":"r","object":"response"}}\n\n'
    scanner = StreamIdScanner()
    assert scanner.feed(other + b"data: [DONE]\n\n") is None and not scanner.done


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"id":"resp_1","object":"response","output":[]}', "resp_1"),
        (b'{"object":"response","output":[],"id":"resp_2"}', "resp_2"),
        (b'{"id":"chatcmpl-1","object":"chat.completion"}', None),
        (b'{"id":3,"object":"response"}', None),
        (b"[1,2]", None),
        (b"not json", None),
    ],
)
def test_id_of_a_whole_body(body: bytes, expected: str | None) -> None:
    assert id_of_body(body) == expected


# --- answer rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("complete", "buffered", "length", "small"),
    [
        (True, 100, b"100", True),  # it all came with the head
        (True, 0, None, True),  # an empty body, delimited by the close
        (False, 0, b"100", True),
        (False, 0, b"%d" % WHOLE_LIMIT, True),
        (False, 0, b"%d" % (WHOLE_LIMIT + 1), False),  # a big image answer streams on
        (False, 10, None, False),  # unsized (chunked speech audio) streams on as it arrives
        (False, 0, b"junk", False),
    ],
)
def test_which_answers_go_out_whole(
    complete: bool, buffered: int, length: bytes | None, small: bool
) -> None:
    conn = _Connection(UpstreamPool(), ("127.0.0.1", 1))
    conn.complete, conn.buffered = complete, buffered
    if length is not None:
        conn.headers = [(b"content-type", b"application/json"), (b"content-length", length)]
    assert UpstreamResponse(conn, None).small(WHOLE_LIMIT) is small


@pytest.mark.parametrize(
    ("status", "body", "lost"),
    [
        (404, b'{"error":{"message":"model \'m\' is not loaded","code":"model_not_found"}}', True),
        (404, b'{"error":{"message":"The model `m` does not exist."}}', True),
        (409, b'{"detail":"Model not found"}', True),
        (400, b'{"error":{"message":"model is not loaded"}}', True),
        (400, b'{"error":{"message":"\'prompt\' not found"}}', False),
        # a stored response the replica does not have: its own answer, not a lost model
        (404, b'{"error":{"message":"Response with id \'r\' not found.","code":404}}', False),
        (404, b'{"error":{"message":"x not found","code":"response_not_found"}}', False),
        (404, b'{"error":{"message":"no such route"}}', False),
    ],
)
def test_which_answers_mean_the_replica_lost_its_model(
    status: int, body: bytes, lost: bool
) -> None:
    assert _lost_model(status, body) is lost


def test_the_query_string_goes_upstream_with_the_path() -> None:
    body = b'{"model":"m","input":"x"}'
    assert parse_request(b"/v1/embeddings", body).target == b"/v1/embeddings"
    with_query = parse_request(b"/v1/embeddings", body, None, b"api-version=2")
    assert with_query.target == b"/v1/embeddings?api-version=2"
    assert with_query.path == b"/v1/embeddings"
