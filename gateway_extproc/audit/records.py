"""Reading records back: every line of every chain of an audit directory or bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .chain import segments
from .verify import chain_dirs


def records(root: Path, types: frozenset[str] | None = None) -> Iterator[dict[str, Any]]:
    """Parsed records, optionally only of these types. Lines no writer wrote (a partial last
    line, or JSON that is not a record object with a `ts`: tampering) are skipped; reports read
    without verifying, and `audit verify` names those lines."""
    for d in chain_dirs(root):
        for seg in segments(d):
            for line in seg.read_bytes().split(b"\n"):
                rec = _record(line)
                if rec is not None and (types is None or rec.get("type") in types):
                    yield rec


def first_ts(seg: Path) -> str:
    with seg.open("rb") as f:
        return line_ts(f.readline())


def line_ts(line: bytes) -> str:
    """A record line's `ts`; "" for a line no writer wrote."""
    rec = _record(line)
    return rec["ts"] if rec is not None else ""


def _record(line: bytes) -> dict[str, Any] | None:
    if not line:
        return None
    try:
        rec = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("ts"), str) else None
