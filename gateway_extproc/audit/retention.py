"""Retention: drop a chain's oldest segments once every record in them is older than the
stream's retention, without breaking verification.

Only whole segments go, oldest first, never the one being written. Before deleting, the
writer appends a `retention_pruned` record naming the last pruned seq and the hash of its
line, and seals it with a checkpoint; the first remaining segment opens with a signed
checkpoint whose `prev` is that hash. Verify accepts a chain that starts after seq 0 only
when such a record explains exactly the missing prefix.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from .chain import digest, seq_of, segments, tail


def prunable(chain_dir: Path, cutoff_iso: str, active: Path | None) -> list[tuple[Path, int, bytes]]:
    """(segment, its last seq, hash of its last line) for the oldest segments whose last
    record is older than `cutoff_iso` (ISO timestamps of one format compare as strings)."""
    out = []
    for seg in segments(chain_dir):
        if seg == active:
            break
        line, _ = tail(seg)
        if line is None:
            continue  # empty (a crash right after creating it); goes with the next prunable one
        if _ts(line) >= cutoff_iso:
            break
        out.append((seg, seq_of(line)[0], digest(line)))
    return out


def _ts(line: bytes) -> str:
    return orjson.loads(line).get("ts", "")
