"""The simulator's Responses API (`/v1/responses`): request fields, response objects, SSE
events, and the bounded store behind `previous_response_id`, GET and DELETE (pure).

A follow-up's prompt is the previous response's conversation (its input and output) plus the
new input, so a chain stays a growing prefix (the engine model's cache sees it), and its text
starts with `[after <previous id>]`: a test can tell which replica held the previous response.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from corral.backends.sim.engine import Generation, StreamEvents
from corral.errors import BadRequest, ResponseNotFound


def not_found(response_id: str, param: str) -> ResponseNotFound:
    return ResponseNotFound(f"Response with id '{response_id}' not found.", param=param)


class StoredResponse(NamedTuple):
    body: dict[str, Any]  # the response object as GET returns it
    context: str  # the conversation a follow-up continues


class ResponseStore:
    """The newest `capacity` stored responses by id (0 stores none)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, response_id: str) -> StoredResponse | None:
        return self._items.get(response_id)

    def put(self, response_id: str, stored: StoredResponse) -> None:
        if self.capacity <= 0:
            return
        self._items[response_id] = stored
        self._items.move_to_end(response_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def delete(self, response_id: str) -> bool:
        return self._items.pop(response_id, None) is not None


# --- request -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponsesRequest:
    """The fields of a `POST /v1/responses` body the simulator uses."""

    input_text: str  # the new input rendered as `role: text` lines
    instructions: str | None
    previous_response_id: str | None
    max_output_tokens: int | None
    store: bool
    stream: bool
    metadata: dict[str, Any] | None
    temperature: float | None
    top_p: float | None


def _part_text(part: Any) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict):
        text = part.get("text")
        if isinstance(text, str):
            return text
        return ""  # images, files: no text
    raise BadRequest("every content part must be an object or a string", param="input")


def _item_line(item: Any) -> str:
    if not isinstance(item, dict):
        raise BadRequest("every input item must be an object", param="input")
    kind = item.get("type", "message")
    if kind == "message" or "role" in item:
        role = item.get("role", "user")
        content = item.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            text = "\n".join(_part_text(p) for p in content)
        else:
            raise BadRequest("a message's 'content' must be a string or a list", param="input")
        return f"{role}: {text}\n"
    if kind == "function_call_output":
        output = item.get("output")
        return f"tool: {output if isinstance(output, str) else orjson.dumps(output).decode()}\n"
    if kind == "function_call":
        return f"assistant: call {item.get('name')}({item.get('arguments', '')})\n"
    return ""  # reasoning and other items carry nothing the simulator reads


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise BadRequest(f"'{name}' has the wrong type", param=name)
    return value


def parse_request(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a Responses request body (400 naming the field on bad input)."""
    raw = body.get("input")
    if isinstance(raw, str):
        input_text = f"user: {raw}\n"
    elif isinstance(raw, list) and raw:
        input_text = "".join(_item_line(item) for item in raw)
    else:
        raise BadRequest("'input' is required: a string or a non-empty list", param="input")
    cap = _optional(body, "max_output_tokens", int)
    if cap is not None and cap < 1:
        raise BadRequest("'max_output_tokens' must be >= 1", param="max_output_tokens")
    store = body.get("store", True)
    if not isinstance(store, bool | None):
        raise BadRequest("'store' must be a boolean", param="store")
    metadata = body.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object", param="metadata")
    return ResponsesRequest(
        input_text=input_text,
        instructions=_optional(body, "instructions", str),
        previous_response_id=_optional(body, "previous_response_id", str),
        max_output_tokens=cap,
        store=store is not False,
        stream=body.get("stream") is True,
        metadata=metadata,
        temperature=_optional(body, "temperature", (int, float)),
        top_p=_optional(body, "top_p", (int, float)),
    )


def prompt_text(request: ResponsesRequest, previous: StoredResponse | None) -> str:
    """What generation and the engine model see: instructions, history, new input."""
    system = f"system: {request.instructions}\n" if request.instructions else ""
    history = previous.context if previous is not None else ""
    return system + history + request.input_text


# --- response ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ResponseDraft:
    """Everything a response object needs but the engine's cached tokens."""

    rid: str
    created: int
    model: str
    request: ResponsesRequest
    context: str  # the conversation including this answer, for a follow-up
    deltas: list[str]  # the text in the pieces a stream sends
    input_tokens: int
    output_tokens: int
    incomplete: bool  # max_output_tokens cut it short

    @property
    def msg_id(self) -> str:
        return "msg_" + self.rid.removeprefix("resp_")

    @property
    def text(self) -> str:
        return "".join(self.deltas)


def draft(
    rid: str,
    created: int,
    model: str,
    request: ResponsesRequest,
    previous: StoredResponse | None,
    gen: Generation,
    input_tokens: int,
) -> ResponseDraft:
    deltas = gen.tokens()
    if request.previous_response_id is not None:
        marker = f"[after {request.previous_response_id}]"
        deltas = [marker, *(" " + d.lstrip(" ") for d in deltas)] if deltas else [marker]
    history = previous.context if previous is not None else ""
    text = "".join(deltas)
    return ResponseDraft(
        rid=rid,
        created=created,
        model=model,
        request=request,
        context=f"{history}{request.input_text}assistant: {text}\n",
        deltas=deltas,
        input_tokens=input_tokens,
        output_tokens=gen.completion_tokens,
        incomplete=gen.finish_reason == "length",
    )


def _message(d: ResponseDraft, done: bool) -> dict[str, Any]:
    return {
        "id": d.msg_id,
        "type": "message",
        "status": "completed" if done else "in_progress",
        "role": "assistant",
        "content": [_text_part(d.text)] if done else [],
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def response_object(d: ResponseDraft, *, done: bool, cached: int = 0) -> dict[str, Any]:
    """The response object: finished (with output and usage) or as it begins."""
    r = d.request
    status = ("incomplete" if d.incomplete else "completed") if done else "in_progress"
    return {
        "id": d.rid,
        "object": "response",
        "created_at": d.created,
        "status": status,
        "completed_at": d.created if done else None,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if done and d.incomplete else None,
        "instructions": r.instructions,
        "max_output_tokens": r.max_output_tokens,
        "metadata": r.metadata or {},
        "model": d.model,
        "output": [_message(d, True)] if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": r.previous_response_id,
        "reasoning": None,
        "store": r.store,
        "temperature": r.temperature if r.temperature is not None else 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": r.top_p if r.top_p is not None else 1.0,
        "truncation": "disabled",
        "usage": _usage(d, cached) if done else None,
        "user": None,
    }


def _usage(d: ResponseDraft, cached: int) -> dict[str, Any]:
    return {
        "input_tokens": d.input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": d.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": d.input_tokens + d.output_tokens,
    }


def _event(kind: str, seq: int, fields: dict[str, Any]) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def stream_events(d: ResponseDraft, finished: dict[str, Any]) -> StreamEvents:
    """The SSE events of a streamed response, OpenAI's sequence; `finished` is the final
    response object (`response_object(d, done=True, ...)`)."""
    begun = response_object(d, done=False)
    where = {"item_id": d.msg_id, "output_index": 0, "content_index": 0}
    head = [
        _event("response.created", 0, {"response": begun}),
        _event("response.in_progress", 1, {"response": begun}),
        _event("response.output_item.added", 2, {"output_index": 0, "item": _message(d, False)}),
        _event("response.content_part.added", 3, {**where, "part": _text_part("")}),
    ]
    prefix = (
        b"event: response.output_text.delta\ndata: "
        b'{"type":"response.output_text.delta","item_id":'
        + orjson.dumps(d.msg_id)
        + b',"output_index":0,"content_index":0,"logprobs":[],"delta":'
    )
    tokens = [
        b'%b%b,"sequence_number":%d}\n\n' % (prefix, orjson.dumps(delta), 4 + i)
        for i, delta in enumerate(d.deltas)
    ]
    seq = 4 + len(tokens)
    text = d.text
    final = "response.incomplete" if d.incomplete else "response.completed"
    tail = [
        _event("response.output_text.done", seq, {**where, "text": text, "logprobs": []}),
        _event("response.content_part.done", seq + 1, {**where, "part": _text_part(text)}),
        _event(
            "response.output_item.done", seq + 2, {"output_index": 0, "item": _message(d, True)}
        ),
        _event(final, seq + 3, {"response": finished}),
    ]
    return StreamEvents(head, tokens, tail)


def deleted(response_id: str) -> bytes:
    return orjson.dumps({"id": response_id, "object": "response", "deleted": True})
