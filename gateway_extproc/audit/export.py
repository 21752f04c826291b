"""`gateway-extproc audit export`: a bundle an auditor verifies offline with `audit verify`.

For each chain, the segments overlapping [from, to] (whole segments: a chain verifies from a
signed checkpoint, and every segment opens with one), cut so the bundle ends sealed: after
the next segment's opening checkpoint, or after the last checkpoint of a segment still being
written. Records outside the window inside those segments come along (they are part of the
chain); reports over the bundle filter by time. Plus the config versions those records name
(configs/<sha256>.yaml) and a manifest.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import orjson

from .chain import CHECKPOINT, seq_of, segments, tail
from .records import first_ts, line_ts
from .verify import MANIFEST, chain_dirs
from .writer import CONFIGS


def export(root: Path, out: Path, start: str, end: str) -> dict:
    """start/end: ISO timestamps in the trail's format (UTC, `Z`)."""
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; export into a new directory")
    manifest: dict = {"created": datetime.now(timezone.utc).isoformat(), "from": start, "to": end,
                      "source": str(root), "chains": {}}
    configs: set[str] = set()
    for d in chain_dirs(root):
        name = d.relative_to(root).as_posix()
        segs = segments(d)
        chosen = [i for i, s in enumerate(segs) if _overlaps(s, segs[i + 1] if i + 1 < len(segs) else None, start, end)]
        if not chosen:
            continue
        lo, hi = chosen[0], chosen[-1]
        target = out / name
        target.mkdir(parents=True, exist_ok=True)
        for seg in segs[lo:hi]:
            shutil.copyfile(seg, target / seg.name)
        last = segs[hi]
        if hi + 1 < len(segs):
            shutil.copyfile(last, target / last.name)
            with segs[hi + 1].open("rb") as f:
                seal = f.readline()
            if seal.endswith(b"\n"):
                (target / segs[hi + 1].name).write_bytes(seal)
        else:
            data = last.read_bytes()
            cut = _after_last_checkpoint(data)
            (target / last.name).write_bytes(data[:cut])
        copied = sorted(target.glob("*.jsonl"))
        with copied[0].open("rb") as f:
            first_line = f.readline()
        last_line, _ = tail(copied[-1])
        manifest["chains"][name] = {"first_seq": _seq(first_line), "last_seq": _seq(last_line)}
        for f in copied:
            for line in f.read_bytes().split(b"\n"):
                if b'"config' in line:
                    try:
                        rec = orjson.loads(line)
                    except orjson.JSONDecodeError:
                        continue
                    configs.add(rec.get("config_sha256") or rec.get("config") or "")
    for path in sorted((root / CONFIGS).glob("*.yaml")) if (root / CONFIGS).is_dir() else []:
        if any(c and path.stem.startswith(c) for c in configs):
            (out / CONFIGS).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, out / CONFIGS / path.name)
    manifest["configs"] = sorted(p.stem for p in (out / CONFIGS).glob("*.yaml")) if (out / CONFIGS).is_dir() else []
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
    return manifest


def _overlaps(seg: Path, nxt: Path | None, start: str, end: str) -> bool:
    """Whether the segment's records may fall in [start, end]: it begins at its first record and
    ends before the next segment begins (or at its last record). An end no record dates (a
    line no writer wrote) may be anywhere: the segment goes in, and verify names that line."""
    begin = first_ts(seg)
    if nxt is not None:
        finish = first_ts(nxt)
    else:
        line, _ = tail(seg)
        finish = line_ts(line) if line else begin
    return begin <= end and (finish or "~") >= start


def _seq(line: bytes | None) -> int | None:
    """A record line's seq; None for none, or a line no writer wrote (verify names it)."""
    try:
        return seq_of(line)[0] if line else None
    except ValueError:
        return None


def _after_last_checkpoint(data: bytes) -> int:
    """Byte offset just after the last complete checkpoint line."""
    pos = len(data)
    while True:
        nl = data.rfind(b"\n", 0, pos)
        if nl < 0:
            return 0
        start = data.rfind(b"\n", 0, nl) + 1
        line = data[start:nl]
        try:
            _, comma = seq_of(line)
        except ValueError:
            pos = nl
            continue
        if line.startswith(CHECKPOINT, comma + 1):
            return nl + 1
        pos = nl
