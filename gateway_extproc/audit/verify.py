"""`gateway-extproc audit verify`: check every chain of an audit directory or export bundle.

Per chain, one pass over the bytes (segments in parallel, then linked in order) (JSON is parsed only for checkpoints and retention
records): each line's `seq` follows the previous one and its `prev` is the previous line's
SHA-256; each checkpoint's Ed25519 signature verifies with the published public key and
names its chain. The first failure is diagnosed from its neighbours and named by file and
line: a modified record, a deleted, inserted or reordered one, a checkpoint signed by
another key. A chain that starts after seq 0 must be explained by a signed retention record
(or be an export bundle, which starts at a checkpoint by design).

Ends of chains are reported, not failed: records after the last checkpoint, or a last
checkpoint other than the writer's `shutdown`, are "open" (a live writer, or a crash within
the checkpoint interval; a file cut at a checkpoint looks the same), and a partial last line
is a write a crash cut short. Those are what the fsync policy allows to be lost
(docs/audit.md). A process's `gateway` chain names in its checkpoints how far each of its
other chains had got (`heads`): a chain missing, or ending before that, is bad.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from binascii import hexlify
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from . import signing
from .chain import CHECKPOINT, GENESIS, HEAD, PREV, SEQ, SEQ_AT, digest, segments, seq_of, unsigned_part

MANIFEST = "manifest.json"
PARALLEL_BYTES = 32 << 20  # below this, starting worker processes costs more than it saves
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
        span = f"seq {self.first_seq}..{self.last_seq}" if self.last_seq is not None else "empty"
        head = (f"{self.status.upper():9} {self.name}" if self.status == "bad" else
                f"{self.status.upper():9} {self.name}: {self.records} records ({span}), {self.checkpoints} checkpoints")
        return "\n".join([head, *(f"          {n}" for n in ([self.problem] if self.problem else []) + self.notes)])


class _Bad(Exception):
    pass


def chain_dirs(root: Path) -> Iterator[Path]:
    """Every directory holding segment files, below root, in name order."""
    for d in sorted({p.parent for p in root.rglob("*.jsonl")}):
        if d.name != "configs":
            yield d


def verify_dir(root: Path, public: Ed25519PublicKey | list[Ed25519PublicKey],
               workers: int | None = None) -> list[ChainResult]:
    """Segments are scanned in parallel (each on its own: hashes, seq, signatures), then each
    chain's segments are linked in order; hashing dominates, so this scales with cores."""
    manifest = _manifest(root)
    bundle = manifest is not None
    chains = [(d, d.relative_to(root).as_posix(), segments(d)) for d in chain_dirs(root)]
    jobs = [(seg, name) for _, name, segs in chains for seg in segs]
    keys = _keys(public)
    raw = [k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for k in keys.values()]
    size = sum(seg.stat().st_size for seg, _ in jobs)
    workers = workers or min(os.cpu_count() or 1, len(jobs))
    if workers > 1 and size > PARALLEL_BYTES:
        ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            scans = list(pool.map(_scan_job, [(seg, name, raw) for seg, name in jobs], chunksize=1))
    else:
        scans = [scan_segment(seg, name, keys) for seg, name in jobs]
    by_path = {seg: scan for (seg, _), scan in zip(jobs, scans)}
    results = [link(name, [by_path[s] for s in segs], bundle) for _, name, segs in chains]
    if manifest is not None:
        results += _check_manifest(manifest, {r.name: r for r in results})
    else:  # a bundle holds the chains and window asked for
        for _, name, segs in chains:
            heads = next((by_path[s].heads for s in reversed(segs) if by_path[s].heads), None)
            if heads is not None:
                results += _check_siblings(name, *heads, {r.name: r for r in results})
    return results


def _manifest(root: Path) -> dict | None:
    """An export bundle's manifest.json (chains may start and end where export cut them), if any."""
    try:
        doc = orjson.loads((root / MANIFEST).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def _check_manifest(manifest: dict, results: dict[str, ChainResult]) -> list[ChainResult]:
    """A bundle is what export wrote: the chains its manifest lists, each from and to the seq it
    names. Else a manifest.json put into a live directory would excuse a chain's deleted start.
    Returns the listed chains that are not there."""
    listed = manifest.get("chains") if isinstance(manifest.get("chains"), dict) else {}
    for name, r in results.items():
        want = listed.get(name)
        if not isinstance(want, dict):
            problem = "not in the bundle's manifest.json (a manifest makes verify accept chains that start " \
                      "after seq 0: one put into an audit directory hides deleted segments)"
        else:
            problem = next((f"{end} at seq {got}, but the bundle's manifest.json says {want.get(key)}"
                            for end, key, got in (("starts", "first_seq", r.first_seq), ("ends", "last_seq", r.last_seq))
                            if isinstance(want.get(key), int) and want.get(key) != got), None)
        if problem is not None and r.status != "bad":
            r.status, r.problem = "bad", problem
    return [ChainResult(name, status="bad", problem="listed in the bundle's manifest.json, missing (deleted)")
            for name in sorted(set(listed) - set(results))]


def _check_siblings(name: str, heads: dict, where: str, results: dict[str, ChainResult]) -> list[ChainResult]:
    """A gateway chain's last signed checkpoint names how far each sibling chain (the same
    process's tiers) had got: one missing, or ending before that, lost records at its end.
    Returns the chains it names that are not there at all."""
    missing = []
    said = f"the gateway chain's signed checkpoint at {where} says it reached seq"
    for stream, seq in sorted(heads.items()):
        sibling = f"{name.rsplit('/', 1)[0]}/{stream}"
        r = results.get(sibling)
        if r is None:
            missing.append(ChainResult(sibling, status="bad", problem=f"chain missing (deleted): {said} {seq}"))
        elif r.status != "bad" and (r.last_seq is None or r.last_seq < seq):
            first = 0 if r.last_seq is None else r.last_seq + 1
            r.status, r.problem = "bad", f"records seq {first}..{seq} missing at its end (cut or deleted): {said} {seq}"
    return missing


def _keys(public: Ed25519PublicKey | list[Ed25519PublicKey]) -> dict[str, Ed25519PublicKey]:
    """Published keys by id: several after a key rotation (each checkpoint names its key)."""
    return {signing.key_id(k): k for k in (public if isinstance(public, list) else [public])}


@dataclass
class SegmentScan:
    """One segment checked on its own; `link` joins them."""

    name: str
    records: int = 0
    checkpoints: int = 0
    first: tuple[int, bytes, bool, int | None] | None = None  # seq, prev, is checkpoint, partial_bytes it names
    last_seq: int = -1
    last_hash: bytes = b""
    since_checkpoint: int = 0  # records after its last checkpoint
    has_checkpoint: bool = False
    sealed_by: str | None = None  # the reason of its last checkpoint (`shutdown`: the writer stopped)
    heads: tuple[dict, str] | None = None  # a gateway chain's last word on its siblings' seqs, and where
    pruned: tuple[int, bytes] | None = None
    partial: int = 0  # bytes of a partial last line
    problem: str | None = None


def _scan_job(job: tuple[Path, str, list[bytes]]) -> SegmentScan:
    seg, name, raw = job
    return scan_segment(seg, name, _keys([Ed25519PublicKey.from_public_bytes(r) for r in raw]))


def scan_segment(seg: Path, name: str, keys: dict[str, Ed25519PublicKey]) -> SegmentScan:
    scan = SegmentScan(seg.name)
    lines = seg.read_bytes().split(b"\n")
    scan.partial = len(lines.pop())
    expected_prev = b""
    expected_seq = -1
    for i, line in enumerate(lines):
        if line[:9] != HEAD or line[73:81] != SEQ:
            scan.problem = f"{seg.name}:{i + 1} is not an audit record (modified or inserted)"
            return scan
        try:
            end = line.index(b",", SEQ_AT)
            seq = int(line[SEQ_AT:end])
        except ValueError:
            scan.problem = f"{seg.name}:{i + 1} is not an audit record (modified or inserted)"
            return scan
        prev = line[9:73]
        is_cp = line.startswith(CHECKPOINT, end + 1)
        if i == 0:
            scan.first = (seq, prev, is_cp, _json(line).get("partial_bytes") if is_cp else None)
        elif seq != expected_seq or prev != expected_prev:
            scan.problem = _diagnose(seg, lines, i, expected_seq, expected_prev)
            return scan
        if is_cp:
            try:
                body = _check_signature(line, seg, i, name, keys)
            except _Bad as exc:
                scan.problem = str(exc)
                return scan
            scan.sealed_by = str(body.get("reason"))
            if isinstance(body.get("heads"), dict):
                scan.heads = (body["heads"], f"{name}/{seg.name}:{i + 1}")
            scan.checkpoints += 1
            scan.has_checkpoint = True
            scan.since_checkpoint = 0
        else:
            scan.since_checkpoint += 1
            if line.startswith(_PRUNED, end + 1):
                rec = _json(line)
                scan.pruned = (int(rec.get("through_seq", -1)), str(rec.get("head", "")).encode())
        expected_prev, expected_seq = hexlify(sha256(line).digest()), seq + 1
        scan.records += 1
    scan.last_seq, scan.last_hash = expected_seq - 1, expected_prev
    return scan


def link(name: str, scans: list[SegmentScan], bundle: bool) -> ChainResult:
    res = ChainResult(name)
    try:
        _link(scans, bundle, res)
    except _Bad as exc:
        res.status, res.problem = "bad", str(exc)
    return res


def _link(scans: list[SegmentScan], bundle: bool, res: ChainResult) -> None:
    expected_prev: bytes | None = None
    expected_seq = -1
    before = ""
    since = 0
    partial: tuple[str, int] | None = None
    sealed_by: str | None = None
    pruned: tuple[int, bytes] | None = None
    anchor: tuple[int, bytes] | None = None
    for scan in scans:
        if scan.first is None:  # empty, or only a partial line (a crash right after creating it)
            if scan.problem:
                raise _Bad(scan.problem)
            if scan.partial:
                partial = (scan.name, scan.partial)
            continue
        seq, prev, is_cp, acknowledged = scan.first
        if scan.problem and scan.problem.startswith(f"{scan.name}:1:"):
            raise _Bad(scan.problem)  # its opening checkpoint names the cause (another chain's file, another key)
        if expected_prev is None:
            if not is_cp:
                raise _Bad(f"{scan.name}:1: the chain does not start with a signed checkpoint")
            res.first_seq = seq
            if not (seq == 0 and prev == GENESIS):
                anchor = (seq, prev)
        elif seq > expected_seq:
            raise _Bad(f"record(s) seq {expected_seq}..{seq - 1} deleted: {scan.name}:1 (seq {seq}) follows "
                       f"seq {expected_seq - 1} at the end of {before}")
        elif seq < expected_seq:
            raise _Bad(f"{scan.name}:1: seq {seq} does not follow seq {expected_seq - 1} at the end of {before} "
                       "(inserted, copied or moved)")
        elif prev != expected_prev:
            raise _Bad(f"record seq {expected_seq - 1} at the end of {before} was modified: its hash no longer "
                       f"matches what {scan.name}:1 recorded")
        if partial is not None:
            # The segment before ended in a partial line: only a resume checkpoint that names
            # those bytes explains it (a crash mid-write, then a restart).
            if not (is_cp and acknowledged == partial[1]):
                raise _Bad(f"{partial[0]} ends in {partial[1]} bytes of a partial record that no resume "
                           "checkpoint acknowledges (cut or modified)")
            res.notes.append(f"{partial[0]}: a crash cut the last write ({partial[1]} bytes); "
                             f"acknowledged by the resume checkpoint at seq {seq}")
            partial = None
        if scan.problem:
            raise _Bad(scan.problem)
        res.records += scan.records
        res.checkpoints += scan.checkpoints
        since = scan.since_checkpoint if scan.has_checkpoint else since + scan.records
        sealed_by = scan.sealed_by or sealed_by
        pruned = scan.pruned or pruned
        expected_prev, expected_seq, before = scan.last_hash, scan.last_seq + 1, scan.name
        if scan.partial:
            partial = (scan.name, scan.partial)
    res.last_seq = expected_seq - 1 if res.records else None
    if anchor is not None and not bundle:
        if pruned is None or pruned[0] != anchor[0] - 1 or pruned[1] != anchor[1]:
            raise _Bad(f"records 0..{anchor[0] - 1} are missing and no signed retention record explains it "
                       "(deleted, or copied out of a longer chain)")
        res.notes.append(f"records 0..{anchor[0] - 1} pruned by retention (signed retention record)")
    if partial is not None:
        res.status = "truncated"
        res.notes.append(f"{partial[0]} ends in a partial record of {partial[1]} bytes: a crash cut the last "
                         "write (what the fsync policy allows to lose), or the file was cut")
    if not since and sealed_by != "shutdown" and res.records and not bundle:
        # Every line up to a checkpoint verifies, so a file cut right after one looks whole:
        # only the writer's shutdown checkpoint says nothing follows (a bundle ends at a
        # checkpoint by design).
        if res.status == "ok":
            res.status = "open"
        res.notes.append(f"the chain ends at a checkpoint for {sealed_by!r}, not 'shutdown': a live writer, a "
                         "crash, or a tail cut at a checkpoint (records after it would be missing unseen)")
    if since:
        if res.status == "ok":
            res.status = "open"
        res.notes.append(f"the last {since} records follow the last checkpoint and are not signed yet "
                         "(a live writer, or a crash within the checkpoint interval; or a cut tail)")


def _check_signature(line: bytes, seg: Path, i: int, name: str, keys: dict[str, Ed25519PublicKey]) -> dict:
    """The checkpoint's fields, once its signature and chain check out."""
    parts = unsigned_part(line)
    where = f"{seg.name}:{i + 1}"
    if parts is None:
        raise _Bad(f"{where}: checkpoint without a signature (modified)")
    body = _json(line)
    public = keys.get(str(body.get("key")))
    if public is None:
        raise _Bad(f"{where}: checkpoint signed by key {body.get('key')}, not the published key "
                   f"{' or '.join(keys)} (re-signed, or verify was not given every published key)")
    if not signing.verify(public, parts[1], parts[0]):
        raise _Bad(f"{where}: checkpoint signature does not verify (the checkpoint or the records before it "
                   "were modified and re-hashed)")
    if body.get("chain") != name:
        raise _Bad(f"{where}: checkpoint belongs to chain {body.get('chain')!r}, found in {name!r} (moved)")
    return body


def _json(line: bytes) -> dict:
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _diagnose(seg: Path, lines: list[bytes], i: int, want_seq: int, want_prev: bytes) -> str:
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
            return f"{where} says seq {seq} where {want_seq} was due, though it follows {before}: its seq was changed"
        return f"record(s) seq {want_seq}..{seq - 1} deleted: {where} (seq {seq}) follows {before}"
    if seq is not None and seq < want_seq:
        if seq == want_seq - 1:
            nxt = info[1][1] if len(info) > 1 else None
            if nxt == own:
                return f"a record was inserted at {seg.name}:{i}: it claims seq {seq}, and {where} is the genuine one"
            return f"a record was inserted at {where}: it repeats seq {seq}"
        return f"{where}: seq {seq} goes backwards after seq {want_seq - 1} (inserted or moved record)"
    return f"{where} is not an audit record (modified or inserted)"
