"""The on-disk hash chain: record format, hashing, signed checkpoints, segment files.

A chain is a directory of segment files `<first seq>.jsonl`, one JSON object per line.
Every line starts with the same two fields in the same bytes, so verify reads them without
parsing JSON:

    {"prev":"<sha256 hex of the previous line>","seq":<n>,"type":"...","ts":"...",...}

A line's hash is SHA-256 over its bytes (without the newline); the next line carries it in
`prev`. A checkpoint is a line of type `checkpoint` that ends with `"sig":"<base64>"`: an
Ed25519 signature over the same line without the `sig` field, which includes `prev`, so a
checkpoint signs everything before it. Every segment opens with a checkpoint, which is what
makes a chain whose older segments were pruned verifiable from its first remaining file.
One process writes a chain (one per worker and stream); nothing is shared between writers.
"""

from __future__ import annotations

import hashlib
import os
from binascii import hexlify
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..logs import one_line
from .signing import SIGNATURE_B64_LEN, Signer

GENESIS = b"0" * 64
HEAD = b'{"prev":"'
SEQ = b'","seq":'
SEQ_AT = len(HEAD) + 64 + len(SEQ)  # 81: where the seq digits start
PREV = slice(len(HEAD), len(HEAD) + 64)
CHECKPOINT = b'"type":"checkpoint"'
SIG = b',"sig":"'
SIG_TAIL = len(SIG) + SIGNATURE_B64_LEN + 2  # ,"sig":"<88>"}
SUFFIX = ".jsonl"
_TAIL_READ = 1 << 20


def digest(line: bytes) -> bytes:
    return hexlify(hashlib.sha256(line).digest())


def encode(prev: bytes, seq: int, fields: dict[str, Any]) -> bytes:
    body = one_line(fields)  # a prompt's U+2028 would be a line break to some readers
    return b"".join((HEAD, prev, SEQ, str(seq).encode(), b",", body[1:]))


def sign_line(unsigned: bytes, signer: Signer) -> bytes:
    return unsigned[:-1] + SIG + signer.sign(unsigned) + b'"}'


def unsigned_part(line: bytes) -> tuple[bytes, bytes] | None:
    """(the signed bytes, the base64 signature) of a checkpoint line, or None."""
    if len(line) <= SIG_TAIL or line[-SIG_TAIL:-SIG_TAIL + len(SIG)] != SIG or not line.endswith(b'"}'):
        return None
    return line[:-SIG_TAIL] + b"}", line[-SIG_TAIL + len(SIG):-2]


def seq_of(line: bytes) -> tuple[int, int]:
    """(seq, index of the comma after it); ValueError when the line is not a record."""
    end = line.index(b",", SEQ_AT)
    return int(line[SEQ_AT:end]), end


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def segments(chain_dir: Path) -> list[Path]:
    """Segment files in chain order."""
    found = [p for p in chain_dir.glob(f"*{SUFFIX}") if p.stem.isdigit()]
    return sorted(found, key=lambda p: int(p.stem))


def tail(path: Path) -> tuple[bytes | None, int]:
    """(the last complete line, bytes after it) of a segment: what a crash left."""
    size = path.stat().st_size
    with path.open("rb") as f:
        start = max(0, size - _TAIL_READ)
        while True:
            f.seek(start)
            data = f.read()
            cut = data.rfind(b"\n")
            partial = len(data) - cut - 1
            if cut >= 0:
                prev_nl = data.rfind(b"\n", 0, cut)
                if prev_nl >= 0 or start == 0:
                    return data[prev_nl + 1:cut], partial
            if start == 0:
                return None, partial
            start = max(0, start - _TAIL_READ)


class Chain:
    """The writing end of one chain. Used by the writer thread only."""

    def __init__(self, root: Path, name: str, signer: Signer, now: Callable[[], float]) -> None:
        self.dir = root / name
        self.name = name
        self.signer = signer
        self.now = now
        self.seq = -1
        self.head = GENESIS
        self.fd: int | None = None
        self.segment: Path | None = None
        self.segment_bytes = 0
        self.segment_started = 0.0
        self.pending: list[bytes] = []
        self.pending_records = 0  # records (not checkpoints) in `pending`: what a failed write loses
        self.unsealed = 0  # records since the last checkpoint
        self.segment_records = 0  # records (not checkpoints) in the open segment

    def open(self) -> None:
        """Start a new segment: the chain's first (genesis), or after what a previous process
        left (resume; a partial last line from a crash is named in the signed checkpoint)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        extra: dict[str, Any] = {}
        for seg in reversed(segments(self.dir)):
            line, partial = tail(seg)
            if partial and "partial_bytes" not in extra:
                extra = {"partial_bytes": partial, "partial_segment": seg.name}
            if line is not None:
                self.seq, self.head = seq_of(line)[0], digest(line)
                self._start_segment("resume", extra)
                return
        self._start_segment("genesis", extra)

    def _start_segment(self, reason: str, extra: dict[str, Any] | None = None) -> None:
        path = self.dir / f"{self.seq + 1:012d}{SUFFIX}"
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
        self.segment, self.segment_bytes, self.segment_started = path, 0, self.now()
        self.segment_records = 0
        self.checkpoint(reason, extra)

    def append(self, fields: dict[str, Any]) -> None:
        """Raises TypeError (nothing changed) when JSON cannot hold a value."""
        line = encode(self.head, self.seq + 1, fields)
        self.seq += 1
        self.head = digest(line)
        self.pending.append(line)
        self.pending_records += 1
        self.unsealed += 1
        self.segment_records += 1

    def checkpoint(self, reason: str, extra: dict[str, Any] | None = None) -> None:
        self.seq += 1
        fields = {"type": "checkpoint", "ts": iso(self.now()), "chain": self.name, "key": self.signer.key_id,
                  "reason": reason, **(extra or {})}
        line = sign_line(encode(self.head, self.seq, fields), self.signer)
        self.head = digest(line)
        self.pending.append(line)
        self.unsealed = 0

    def flush(self, sync: bool) -> list[bytes]:
        """Write what is pending in one write; returns the lines written."""
        lines = self.pending
        if lines and self.fd is not None:
            self._check_file()
            data = b"\n".join(lines) + b"\n"
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            self.segment_bytes += len(data)
        self.pending, self.pending_records = [], 0  # only once written: a failed write leaves them to be counted as lost
        if sync and self.fd is not None:
            os.fsync(self.fd)
        return lines

    def _check_file(self) -> None:
        """Raise when the open segment is no longer the file at its path (deleted, or its
        directory removed or replaced): writes would go to a file no one can read, counted
        as written. One stat per batch, in the writer thread."""
        assert self.fd is not None and self.segment is not None
        mine, there = os.fstat(self.fd), os.stat(self.segment)  # FileNotFoundError when gone
        if (mine.st_dev, mine.st_ino) != (there.st_dev, there.st_ino):
            raise FileNotFoundError(f"audit segment {self.segment} was replaced")

    def rotate(self) -> list[bytes]:
        written = self.flush(sync=True)
        self.close_fd()
        self._start_segment("rotate")
        return written

    def close(self, extra: dict[str, Any] | None = None) -> list[bytes]:
        self.checkpoint("shutdown", extra)
        written = self.flush(sync=True)
        self.close_fd()
        return written

    def close_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
