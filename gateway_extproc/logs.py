"""structlog set-up: one JSON object per line on stdout, with secrets masked.

Nothing in the gateway passes a key to the logger; the masking processor is the second
line of defence, so a future mistake prints `[REDACTED]` instead of a credential.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson
import structlog

# Gateway keys, OpenAI/Anthropic-style keys and bearer tokens.
_SECRET = re.compile(r"gwk_[A-Za-z0-9-]+_[A-Za-z0-9_-]+|sk-[A-Za-z0-9_-]{8,}|(?i:bearer)\s+\S+")


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return _SECRET.sub("[REDACTED]", value)
    return value


def redact_secrets(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    # Every log line pays this, so first a cheap test over all string values at once: each
    # pattern starts with one of these literals (lower-cased, so a superset of matches).
    text = "\0".join(v for v in event.values() if isinstance(v, str)).lower()
    if "gwk_" not in text and "sk-" not in text and "bearer" not in text:
        return event
    return {k: _mask(v) for k, v in event.items()}


def configure(level: str = "info") -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            # Bytes end to end: no decode of each line to str and encode back on write.
            structlog.processors.JSONRenderer(serializer=lambda obj, **_: orjson.dumps(obj)),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.BytesLoggerFactory(file=sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
