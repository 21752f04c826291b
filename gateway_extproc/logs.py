"""structlog set-up: one JSON object per line on stdout, with secrets masked.

Nothing in the gateway passes a key to the logger; the masking processor is the second
line of defence, so a future mistake prints `[REDACTED]` instead of a credential.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import orjson
import structlog

# Gateway keys and admin tokens, OpenAI/Anthropic-style keys, bearer tokens, AWS access key ids,
# Google API keys.
_SECRET = re.compile(r"gwk_[A-Za-z0-9-]+_[A-Za-z0-9_-]+|gwa_[A-Za-z0-9_-]{16,}|sk-[A-Za-z0-9_-]{8,}"
                     r"|(?i:bearer)\s+\S+|AKIA[0-9A-Z]{16}|AIza[0-9A-Za-z_-]{35}")
_MARKERS = ("gwk_", "gwa_", "sk-", "bearer", "akia", "aiza")  # each pattern's start, lower-cased
# The provider credentials this process loaded (`known_secrets`), whatever their shape
# (an AWS secret key, a vLLM token): masked wherever they appear.
_known: tuple[str, ...] = ()


def known_secrets(values: Iterable[str | None]) -> None:
    """Mask these values too (the runtime's provider credentials, at every config load)."""
    global _known
    _known = tuple(sorted({v for v in values if v and len(v) >= 8}, key=len, reverse=True))


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        value = _SECRET.sub("[REDACTED]", value)
        for secret in _known:
            if secret in value:
                value = value.replace(secret, "[REDACTED]")
        return value
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mask(v) for v in value]
    return value


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def redact_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # Every log line pays this, so first a cheap test over all string values at once (nested
    # ones too): each pattern starts with one of _MARKERS (a superset of matches).
    raw = "\0".join(v if isinstance(v, str) else "\0".join(_strings(v)) for v in event.values()
                    if isinstance(v, (str, dict, list, tuple)))
    text = raw.lower()
    if not any(m in text for m in _MARKERS) and not any(secret in raw for secret in _known):
        return event
    return {k: _mask(v) for k, v in event.items()}


# Unicode line breaks orjson writes raw (valid inside a JSON string; it escapes the control
# characters itself), as UTF-8: U+2028, U+2029, U+0085. A reader that splits lines on every
# Unicode break (Python's str.splitlines, JavaScript, log viewers) would cut a line holding one
# (a prompt under content logging) into pieces that are no JSON.
_RAW_BREAKS = ((b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"), (b"\xc2\x85", b"\\u0085"))


def one_line(obj: Any) -> bytes:
    """`obj` as JSON that every line reader sees as one line: its Unicode line breaks
    escaped too. Log lines and audit records (a prompt in either) are written with it."""
    line = orjson.dumps(obj)
    for raw, escaped in _RAW_BREAKS:
        if raw in line:
            line = line.replace(raw, escaped)
    return line


def render(event: dict[str, Any], **_: Any) -> bytes:
    """One log line: the event as JSON, every line break in it escaped."""
    return one_line(event)


def configure(level: str = "info") -> None:
    masked = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
              structlog.processors.format_exc_info, redact_secrets]
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *masked,
            # Bytes end to end: no decode of each line to str and encode back on write.
            structlog.processors.JSONRenderer(serializer=render),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.BytesLoggerFactory(file=sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    # Libraries log through the standard library (OpenTelemetry's exporters when the collector
    # is down, gRPC, asyncio, redis): the same JSON lines, masked, with the logger's name, on
    # the same stream. Plain text there broke the one-JSON-object-per-line stream and passed
    # the mask. Warnings and above: a library's info is not the gateway's.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *masked,
                    structlog.processors.JSONRenderer(serializer=lambda obj, **_: render(obj).decode())]))
    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h.formatter, structlog.stdlib.ProcessorFormatter)]
    root.addHandler(handler)
    root.setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level.upper()]))
