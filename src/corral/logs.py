"""Log set-up for Corral's processes: text or JSON lines on stderr, each line of a request
carrying its request id (the `REQUEST_ID` context variable the HTTP server sets per request)."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Literal

LogFormat = Literal["text", "json"]

#: The id of the request the running code serves (None outside of requests), as the
#: x-request-id header's bytes: decoded only when a line is logged.
REQUEST_ID: ContextVar[bytes | None] = ContextVar("corral_request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record (`request_id`, and `request_tag`: " [id]"
    or "" for the text format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        text = rid.decode("latin-1") if rid else None
        record.request_id = text
        record.request_tag = f" [{text}]" if text else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, request_id
    when in a request, and the exception's traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, object] = {
            "time": f"{at}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str | int, fmt: LogFormat = "text") -> None:
    """Log records of `level` and above to stderr, as text lines or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def current_format() -> LogFormat:
    """The format `setup_logging` chose for this process (for child processes to follow)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler.formatter, JsonFormatter):
            return "json"
    return "text"
