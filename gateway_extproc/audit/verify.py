"""`gateway-extproc audit verify`: check every chain of an audit directory or export bundle.

Per chain, in one pass over the bytes (JSON is parsed only for checkpoints and retention
records): each line's `seq` follows the previous one and its `prev` is the previous line's
SHA-256; each checkpoint's Ed25519 signature verifies with the published public key and
names its chain. The first failure is diagnosed from its neighbours and named by file and
line: a modified record, a deleted, inserted or reordered one, a checkpoint signed by
another key. A chain that starts after seq 0 must be explained by a signed retention record
(or be an export bundle, which starts at a checkpoint by design).

Ends of chains are reported, not failed: records after the last checkpoint are "open" (a
live writer, or a crash within the checkpoint interval), and a partial last line is a write
a crash cut short. Those are what the fsync policy allows to be lost (docs/audit.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import signing
from .chain import CHECKPOINT, GENESIS, HEAD, PREV, SEQ, SEQ_AT, digest, segments, seq_of, unsigned_part

MANIFEST = "manifest.json"
_PRUNED = b'"type":"retention_pruned"'


@dataclass
class ChainResult:
    name: str
    status: str = "ok"  # ok | open | truncated | bad
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    problem: str | None = None
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        span = f"seq {self.first_seq}..{self.last_seq}" if self.first_seq is not None else "empty"
        head = f"{self.status.upper():9} {self.name}: {self.records} records ({span}), {self.checkpoints} checkpoints"
        return "\n".join([head, *(f"          {n}" for n in ([self.problem] if self.problem else []) + self.notes)])


class _Bad(Exception):
    pass


def chain_dirs(root: Path) -> Iterator[Path]:
    """Every directory holding segment files, below root, in name order."""
    for d in sorted({p.parent for p in root.rglob("*.jsonl")}):
        if d.name != "configs":
            yield d


def verify_dir(root: Path, public: Ed25519PublicKey) -> list[ChainResult]:
    bundle = (root / MANIFEST).exists()
    return [verify_chain(d, d.relative_to(root).as_posix(), public, bundle) for d in chain_dirs(root)]


def verify_chain(chain_dir: Path, name: str, public: Ed25519PublicKey, bundle: bool = False) -> ChainResult:
    res = ChainResult(name)
    try:
        _walk(chain_dir, name, public, bundle, res)
    except _Bad as exc:
        res.status, res.problem = "bad", str(exc)
    return res


def _walk(chain_dir: Path, name: str, public: Ed25519PublicKey, bundle: bool, res: ChainResult) -> None:
    key_id = signing.key_id(public)
    expected_prev: bytes | None = None
    expected_seq = -1
    since_checkpoint = 0
    partial: tuple[str, int] | None = None  # (segment, bytes) a crash left at the end of a segment
    pruned: tuple[int, bytes] | None = None  # (through seq, head) from a retention record
    anchor: tuple[int, bytes] | None = None  # (first seq, its prev) when the chain starts after genesis
    segs = segments(chain_dir)
    for seg in segs:
        data = seg.read_bytes()
        lines = data.split(b"\n")
        rest = lines.pop()
        for i, line in enumerate(lines):
            try:
                if line[:9] != HEAD or line[73:81] != SEQ:
                    raise ValueError
                seq, comma = seq_of(line)
            except ValueError:
                raise _Bad(f"{seg.name}:{i + 1} is not an audit record (modified or inserted)") from None
            prev = line[PREV]
            is_cp = line.startswith(CHECKPOINT, comma + 1)
            if expected_prev is None:
                if not is_cp:
                    raise _Bad(f"{seg.name}:{i + 1}: the chain does not start with a signed checkpoint")
                res.first_seq = seq
                if not (seq == 0 and prev == GENESIS):
                    anchor = (seq, prev)
            elif seq != expected_seq or prev != expected_prev:
                raise _Bad(_diagnose(segs, seg, lines, i, expected_seq, expected_prev))
            if partial is not None:
                # The segment before ended in a partial line: only a resume checkpoint that
                # names those bytes explains it (a crash mid-write, then a restart).
                if not (is_cp and i == 0 and _json(line).get("partial_bytes") == partial[1]):
                    raise _Bad(f"{partial[0]} ends in {partial[1]} bytes of a partial record that no resume "
                               f"checkpoint acknowledges (cut or modified)")
                res.notes.append(f"{partial[0]}: a crash cut the last write ({partial[1]} bytes); "
                                 f"acknowledged by the resume checkpoint at seq {seq}")
                partial = None
            if is_cp:
                _check_signature(line, seg, i, name, public, key_id)
                res.checkpoints += 1
                since_checkpoint = 0
            else:
                since_checkpoint += 1
                if line.startswith(_PRUNED, comma + 1):
                    rec = _json(line)
                    pruned = (int(rec["through_seq"]), str(rec["head"]).encode())
            res.records += 1
            expected_prev, expected_seq = digest(line), seq + 1
        if rest:
            partial = (seg.name, len(rest))
    res.last_seq = expected_seq - 1 if res.records else None
    if anchor is not None and not bundle:
        if pruned is None or pruned[0] != anchor[0] - 1 or pruned[1] != anchor[1]:
            raise_at = f"records 0..{anchor[0] - 1} are missing"
            res.status = "bad"
            res.problem = (f"{raise_at} and no signed retention record explains it (deleted, or copied "
                           "out of a longer chain)")
            return
        res.notes.append(f"records 0..{anchor[0] - 1} pruned by retention (signed retention record)")
    if partial is not None:
        res.status = "truncated"
        res.notes.append(f"{partial[0]} ends in a partial record of {partial[1]} bytes: a crash cut the last "
                         "write (what the fsync policy allows to lose), or the file was cut")
    if since_checkpoint:
        if res.status == "ok":
            res.status = "open"
        res.notes.append(f"the last {since_checkpoint} records follow the last checkpoint and are not signed yet "
                         "(a live writer, or a crash within the checkpoint interval; or a cut tail)")


def _check_signature(line: bytes, seg: Path, i: int, name: str, public: Ed25519PublicKey, key_id: str) -> None:
    parts = unsigned_part(line)
    where = f"{seg.name}:{i + 1}"
    if parts is None:
        raise _Bad(f"{where}: checkpoint without a signature (modified)")
    body = _json(line)
    if body.get("key") != key_id:
        raise _Bad(f"{where}: checkpoint signed by key {body.get('key')}, not the published key {key_id} "
                   "(re-signed, or verify was given the wrong public key)")
    if not signing.verify(public, parts[1], parts[0]):
        raise _Bad(f"{where}: checkpoint signature does not verify (the checkpoint or the records before it "
                   "were modified and re-hashed)")
    if body.get("chain") != name:
        raise _Bad(f"{where}: checkpoint belongs to chain {body.get('chain')!r}, found in {name!r} (moved)")


def _json(line: bytes) -> dict:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _diagnose(segs: list[Path], seg: Path, lines: list[bytes], i: int, want_seq: int, want_prev: bytes) -> str:
    """Name the first bad record around line i of seg, where the chain broke."""
    where = f"{seg.name}:{i + 1}"
    info = []
    for line in lines[i:i + 64]:
        try:
            info.append((seq_of(line)[0], line[PREV], digest(line)))
        except ValueError:
            info.append((None, b"", digest(line)))
    seq, prev, own = info[0]
    before = f"seq {want_seq - 1}" + (f" ({seg.name}:{i})" if i > 0 else f" (end of the segment before {seg.name})")
    if seq == want_seq:
        if len(info) > 1 and info[1][0] == seq and info[1][1] == want_prev:
            return f"a record was inserted at {where}: it claims seq {seq}, and the next line is the genuine one"
        if len(info) > 1 and info[1][1] == own and info[1][0] == seq + 1:
            return (f"record {before} was modified: its hash no longer matches what seq {seq} at {where} "
                    "recorded")
        return f"record seq {seq} at {where} was modified or replaced: it does not chain to {before}"
    if seq is not None and seq > want_seq:
        later = next((k for k, x in enumerate(info) if x[0] == want_seq), None)
        if later is not None:
            return (f"records out of order at {where}: seq {seq} comes before seq {want_seq} "
                    f"({seg.name}:{i + 1 + later}); swapped or moved")
        if prev == want_prev:
            return f"seq {want_seq}..{seq - 1} renumbered at {where}"
        return f"record(s) seq {want_seq}..{seq - 1} deleted: {where} (seq {seq}) follows {before}"
    if seq is not None and seq < want_seq:
        if seq == want_seq - 1:
            nxt = info[1][1] if len(info) > 1 else None
            if nxt == own:
                return f"a record was inserted at {seg.name}:{i}: it claims seq {seq}, and {where} is the genuine one"
            return f"a record was inserted at {where}: it repeats seq {seq}"
        return f"{where}: seq {seq} goes backwards after seq {want_seq - 1} (inserted or moved record)"
    return f"{where} is not an audit record (modified or inserted)"
