"""Reading records back: every line of every chain of an audit directory or bundle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .chain import segments
from .verify import chain_dirs


def records(root: Path, types: frozenset[str] | None = None) -> Iterator[dict[str, Any]]:
    """Parsed records (partial lines skipped), optionally only of these types."""
    for d in chain_dirs(root):
        for seg in segments(d):
            for line in seg.read_bytes().split(b"\n"):
                if not line:
                    continue
                try:
                    rec = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a partial last line; verify reports it
                if types is None or rec.get("type") in types:
                    yield rec


def first_ts(seg: Path) -> str:
    with seg.open("rb") as f:
        line = f.readline()
    try:
        return str(orjson.loads(line).get("ts", ""))
    except orjson.JSONDecodeError:
        return ""
