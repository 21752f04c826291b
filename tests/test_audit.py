"""Audit trail: chain writing, verification and every tamper case, retention, export."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from gateway_extproc.audit import chain as chain_mod
from gateway_extproc.audit.export import export
from gateway_extproc.audit.settings import AuditSettings
from gateway_extproc.audit.signing import Signer, generate, load_public
from gateway_extproc.audit.verify import verify_dir
from gateway_extproc.audit.writer import AuditSink


class Clock:
    def __init__(self, t: float = 1_790_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def settings_for(tmp: Path, **kw) -> AuditSettings:
    base = dict(dir=str(tmp / "audit"), signing_key_file=str(tmp / "k"), instance="", checkpoint_seconds=10,
                fsync="never", fsync_interval_seconds=1, queue_size=100_000, segment_bytes=1 << 30,
                segment_seconds=1e9, retention_days=30)
    base.update(kw)
    return AuditSettings(**base)


@pytest.fixture
def keys(tmp_path: Path):
    key, pub = generate(tmp_path / "k")
    other, _ = generate(tmp_path / "other")
    return Signer.from_file(key), load_public(pub), Signer.from_file(other)


def event(clock: Clock, i: int, tier: str | None = None, **kw) -> dict:
    return {"type": "request", "ts": clock(), "tier": tier, "decision": "admitted", "request_id": f"r{i}",
            "team": "a", "key_id": "k1", "model": "m", "provider": "p", "input_tokens": 10, "output_tokens": 5,
            "cost_nano": 1000, **kw}


def write_chain(tmp: Path, signer: Signer, n: int, every: int = 50, close: bool = True, **kw) -> tuple[AuditSink, Clock]:
    """n request events, a checkpoint every `every` events (the clock moves 1 s per event)."""
    clock = Clock()
    sink = AuditSink(settings_for(tmp, checkpoint_seconds=every, **kw), signer, "host-w0", now=clock)
    sink._last_prune = clock.t  # retention runs when a test asks
    for i in range(n):
        sink.put(event(clock, i))
        clock.t += 1
        sink.cycle()
    if close:
        sink._close_all()
    return sink, clock


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")[:-1]


def only_segment(tmp: Path) -> Path:
    (seg,) = chain_mod.segments(tmp / "audit" / "host-w0" / "gateway")
    return seg


def status(tmp: Path, public) -> tuple[str, str]:
    (r,) = verify_dir(tmp / "audit", public)
    return r.status, (r.problem or "") + " | " + " ".join(r.notes)


def test_a_closed_chain_verifies(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 200)
    (r,) = verify_dir(tmp_path / "audit", public)
    assert (r.status, r.first_seq, r.problem) == ("ok", 0, None)
    assert r.records == r.last_seq + 1 and r.checkpoints >= 5
    first = orjson.loads(lines_of(only_segment(tmp_path))[0])
    assert first["type"] == "checkpoint" and first["reason"] == "genesis" and first["prev"] == "0" * 64


def rewrite(seg: Path, edit) -> None:
    lines = lines_of(seg)
    edit(lines)
    seg.write_bytes(b"\n".join(lines) + b"\n")


def record_index(lines: list[bytes], seq: int) -> int:
    return next(i for i, x in enumerate(lines) if chain_mod.seq_of(x)[0] == seq)


def test_an_edited_byte_names_the_record(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120)
    seg = only_segment(tmp_path)
    rewrite(seg, lambda ls: ls.__setitem__(record_index(ls, 40), ls[record_index(ls, 40)].replace(b'"r', b'"R', 1)))
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and "record seq 40" in msg and "modified" in msg, msg


def test_a_deleted_record_is_named(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120)
    rewrite(only_segment(tmp_path), lambda ls: ls.pop(record_index(ls, 33)))
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and "seq 33..33 deleted" in msg, msg


def test_an_inserted_record_is_named(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120)

    def insert(ls: list[bytes]) -> None:
        i = record_index(ls, 60)
        prev = ls[i][chain_mod.PREV]
        # A forger who knows the format: right seq, right prev, plausible body.
        fake = chain_mod.encode(prev, 60, {"type": "request", "ts": "2026-01-01T00:00:00.000000Z", "team": "x"})
        ls.insert(i, fake)

    rewrite(only_segment(tmp_path), insert)
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and "inserted" in msg and ":" in msg, msg


def test_two_swapped_records_are_named(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120)

    def swap(ls: list[bytes]) -> None:
        i = record_index(ls, 70)
        ls[i], ls[i + 1] = ls[i + 1], ls[i]

    rewrite(only_segment(tmp_path), swap)
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and "out of order" in msg and "seq 71 comes before seq 70" in msg, msg


def test_a_cut_tail_is_reported_as_truncation(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120)
    seg = only_segment(tmp_path)
    seg.write_bytes(seg.read_bytes()[:-150])  # mid-line: the shutdown checkpoint is cut
    st_, msg = status(tmp_path, public)
    assert st_ == "truncated" and "partial record" in msg, msg
    seg.write_bytes(b"".join(x + b"\n" for x in lines_of(seg)[:-10]))  # at a line boundary
    st_, msg = status(tmp_path, public)
    assert st_ == "open" and "not signed yet" in msg, msg


def test_resigned_with_another_key_is_named(tmp_path: Path, keys) -> None:
    signer, public, other = keys
    write_chain(tmp_path, signer, 120)
    seg = only_segment(tmp_path)

    def resign(ls: list[bytes]) -> None:
        # Rewrite a record, then re-hash and re-sign everything after it with another key.
        i = record_index(ls, 20)
        head = ls[i][chain_mod.PREV]
        for j in range(i, len(ls)):
            rec = orjson.loads(ls[j])
            seq = rec.pop("seq")
            rec.pop("prev")
            rec.pop("sig", None)
            if j == i:
                rec["team"] = "someone-else"
            if rec["type"] == "checkpoint":
                rec["key"] = other.key_id
                ls[j] = chain_mod.sign_line(chain_mod.encode(head, seq, rec), other)
            else:
                ls[j] = chain_mod.encode(head, seq, rec)
            head = chain_mod.digest(ls[j])

    rewrite(seg, resign)
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and f"signed by key {other.key_id}" in msg, msg


def test_rehashed_without_resigning_fails_the_signature(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120)

    def rehash(ls: list[bytes]) -> None:
        i = record_index(ls, 20)
        head = ls[i][chain_mod.PREV]
        for j in range(i, len(ls)):
            if b'"type":"checkpoint"' in ls[j]:
                ls[j] = head.join((ls[j][:9], ls[j][73:]))
            else:
                rec = orjson.loads(ls[j])
                seq = rec.pop("seq")
                rec.pop("prev")
                ls[j] = chain_mod.encode(head, seq, rec | ({"team": "z"} if j == i else {}))
            head = chain_mod.digest(ls[j])

    rewrite(only_segment(tmp_path), rehash)
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and "signature does not verify" in msg, msg


def test_every_single_byte_change_is_detected(tmp_path: Path, keys) -> None:
    """Exhaustive over a small sealed chain: each byte in turn replaced by another."""
    signer, public, _ = keys
    write_chain(tmp_path, signer, 12, every=5)
    seg = only_segment(tmp_path)
    original = seg.read_bytes()
    missed = []
    for pos in range(len(original) - 1):
        raw = bytearray(original)
        raw[pos] = ord("x") if raw[pos] != ord("x") else ord("y")
        seg.write_bytes(bytes(raw))
        (r,) = verify_dir(tmp_path / "audit", public)
        if r.status == "ok":
            missed.append(pos)
    assert missed == []


def test_a_crash_mid_write_then_restart_is_acknowledged(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 50, close=False)
    seg = only_segment(tmp_path)
    with seg.open("ab") as f:
        f.write(b'{"prev":"abc')  # a write cut by the crash
    sink, clock = write_chain(tmp_path, signer, 20)  # the restarted process resumes the chain
    (r,) = verify_dir(tmp_path / "audit", public)
    assert r.status == "ok", r.line()
    assert any("acknowledged by the resume checkpoint" in n for n in r.notes)


def test_events_go_to_one_chain_per_tier(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    for i, tier in enumerate(["public", "restricted", None, "public"]):
        sink.put(event(clock, i, tier))
    sink.cycle()
    sink._close_all()
    names = [r.name for r in verify_dir(tmp_path / "audit", public)]
    assert names == ["h-w0/gateway", "h-w0/public", "h-w0/restricted"]


def test_a_full_queue_drops_counts_and_records_the_gap(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path, queue_size=5), signer, "h-w0", now=clock)
    for i in range(12):
        sink.put(event(clock, i))
    assert len(sink.queue) == 5 and sink.dropped == 7
    sink.cycle()
    sink._close_all()
    recs = [orjson.loads(x) for x in lines_of(chain_mod.segments(tmp_path / "audit" / "h-w0" / "gateway")[0])]
    assert [r["count"] for r in recs if r["type"] == "events_dropped"] == [7]
    assert sum(r["type"] == "request" for r in recs) == 5


def test_rotation_by_size_keeps_one_verifiable_chain(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 400, segment_bytes=8192)
    segs = chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")
    assert len(segs) > 5
    for s in segs[1:]:
        assert orjson.loads(lines_of(s)[0])["reason"] == "rotate"
    assert status(tmp_path, public)[0] == "ok"


def test_retention_prunes_old_segments_and_the_rest_still_verifies(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    sink, clock = write_chain(tmp_path, signer, 400, close=False, segment_bytes=8192, retention_days=1)
    before = chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")
    sink.prune(clock.t - 200 + 86400)  # a day after the 200th event: the first ~200 are past retention
    after = chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")
    assert 0 < len(after) < len(before)
    sink._close_all()
    st_, msg = status(tmp_path, public)
    assert st_ == "ok" and "pruned by retention" in msg, msg
    # Deleting one more segment by hand is not retention: verify names the gap.
    chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")[0].unlink()
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and "no signed retention record" in msg, msg


def test_export_bundle_verifies_offline(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    write_chain(tmp_path, signer, 400, segment_bytes=8192)
    start = chain_mod.iso(Clock().t + 150)
    end = chain_mod.iso(Clock().t + 250)
    manifest = export(tmp_path / "audit", tmp_path / "bundle", start, end)
    (r,) = verify_dir(tmp_path / "bundle", public)
    assert r.status == "ok", r.line()
    assert r.first_seq > 0 and r.last_seq < 400
    recs = [orjson.loads(x) for s in chain_mod.segments(tmp_path / "bundle" / "host-w0" / "gateway")
            for x in lines_of(s)]
    ts = [x["ts"] for x in recs if x["type"] == "request"]
    assert min(ts) <= start and max(ts) >= end
    assert manifest["chains"]["host-w0/gateway"]["first_seq"] == r.first_seq
    shutil.rmtree(tmp_path / "bundle" / "host-w0" / "gateway")
    (gone,) = verify_dir(tmp_path / "bundle", public)  # the manifest names what the bundle held
    assert (gone.name, gone.status, gone.problem) == (
        "host-w0/gateway", "bad", "listed in the bundle's manifest.json, missing (deleted)")


def test_parallel_verify_links_segments_and_names_a_cut_at_a_boundary(tmp_path: Path, keys, monkeypatch) -> None:
    from gateway_extproc.audit import verify as verify_mod

    signer, public, _ = keys
    write_chain(tmp_path, signer, 400, segment_bytes=8192)
    monkeypatch.setattr(verify_mod, "PARALLEL_BYTES", 0)
    (r,) = verify_mod.verify_dir(tmp_path / "audit", public, workers=2)
    assert r.status == "ok" and r.records == r.last_seq + 1
    segs = chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")
    gone = segs[3]
    first, last = chain_mod.seq_of(lines_of(gone)[0])[0], chain_mod.seq_of(lines_of(gone)[-1])[0]
    gone.unlink()  # a whole segment in the middle
    (r,) = verify_mod.verify_dir(tmp_path / "audit", public, workers=2)
    assert r.status == "bad" and f"seq {first}..{last} deleted: {segs[4].name}:1" in r.problem, r.problem
    # The last record before a boundary edited: named, though the proof is in the next file.
    rewrite(segs[1], lambda ls: ls.__setitem__(-1, ls[-1].replace(b'"team":"a"', b'"team":"b"')))
    (r,) = verify_mod.verify_dir(tmp_path / "audit", public, workers=2)
    assert r.status == "bad" and f"at the end of {segs[1].name} was modified" in r.problem, r.problem


def test_days_per_stream() -> None:
    s = settings_for(Path("/x"), retention_days=90, tier_retention_days={"public": 30, "restricted": 2555})
    assert (s.days_for("public"), s.days_for("internal"), s.days_for("restricted"), s.days_for("gateway")) == (
        30, 90, 2555, 2555)


def test_a_disk_error_loses_only_the_batch_and_the_chain_says_so(tmp_path: Path, keys, monkeypatch) -> None:
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    for i in range(5):
        sink.put(event(clock, i))
    assert sink.safe_cycle() is True
    real = chain_mod.os.write

    def full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(chain_mod.os, "write", full)
    for i in range(3):
        sink.put(event(clock, 5 + i))
    assert sink.safe_cycle() is None  # the batch of 3 is lost, the writer carries on
    monkeypatch.setattr(chain_mod.os, "write", real)
    for i in range(2):
        sink.put(event(clock, 8 + i))
    assert sink.safe_cycle() is True
    sink._close_all()
    (r,) = verify_dir(tmp_path / "audit", public)
    assert r.status == "ok", r.line()
    recs = [orjson.loads(x) for s in chain_mod.segments(tmp_path / "audit" / "h-w0" / "gateway") for x in lines_of(s)]
    assert [x["request_id"] for x in recs if x["type"] == "request"] == ["r0", "r1", "r2", "r3", "r4", "r8", "r9"]
    assert [x["count"] for x in recs if x["type"] == "events_dropped"] == [3]
    assert [x["reason"] for x in recs if x["type"] == "checkpoint"] == ["genesis", "resume", "shutdown"]


def test_every_line_is_shipped_to_a_redis_stream_and_an_outage_only_counts(tmp_path: Path, keys) -> None:
    import redis

    from gateway_extproc.audit.settings import RedisStream
    from gateway_extproc.telemetry.metrics import AUDIT_EVENTS
    from tests.redis_server import RedisServer

    signer, public, _ = keys
    with RedisServer() as server:
        clock = Clock()
        s = settings_for(tmp_path, redis=RedisStream(server.url, "gw:audit", 1000, None))
        sink = AuditSink(s, signer, "h-w0", now=clock)
        from gateway_extproc.audit.writer import _redis_client
        sink._redis = _redis_client(s)
        for i in range(20):
            sink.put(event(clock, i))
        sink.cycle()
        shipped = redis.Redis.from_url(server.url).xrange("gw:audit")
        written = lines_of(chain_mod.segments(tmp_path / "audit" / "h-w0" / "gateway")[0])
        assert [f[b"record"] for _, f in shipped] == written
        assert {f[b"chain"] for _, f in shipped} == {b"h-w0/gateway"}
        failed = AUDIT_EVENTS.labels("ship_failed").value
        server.stop()
        for i in range(5):
            sink.put(event(clock, 20 + i))
        sink.cycle()  # Redis is down: the files still get every record
        assert AUDIT_EVENTS.labels("ship_failed").value == failed + 5
        sink._close_all()
    (r,) = verify_dir(tmp_path / "audit", public)
    assert r.status == "ok" and r.records == 1 + 25 + 1


def test_no_readable_signing_key_no_worker(tmp_path: Path) -> None:
    """Fail closed: a worker whose audit trail cannot be signed does not start."""
    from dataclasses import replace

    from gateway_extproc import audit
    from gateway_extproc.audit.signing import SigningKeyError
    from gateway_extproc.config import parse

    from .test_config import valid

    cfg = replace(parse(valid(), "x"), audit=settings_for(tmp_path, signing_key_file=str(tmp_path / "missing.key")))
    with pytest.raises(SigningKeyError, match="missing.key: cannot read it .* audit keygen"):
        audit.start(cfg, 0)
    (tmp_path / "bad.key").write_text("not a key")
    cfg = replace(cfg, audit=settings_for(tmp_path, signing_key_file=str(tmp_path / "bad.key")))
    with pytest.raises(SigningKeyError, match="not an unencrypted PEM private key"):
        audit.start(cfg, 0)


def test_the_writer_thread_drains_everything_on_stop(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    sink = AuditSink(settings_for(tmp_path, checkpoint_seconds=0.05, segment_bytes=1 << 20), signer, "h-w0").start()
    for i in range(30_000):
        sink.put(event(Clock(), i, tier=("public", "internal", None)[i % 3]))
    sink.stop()
    results = verify_dir(tmp_path / "audit", public)
    assert {r.status for r in results} == {"ok"}, [r.line() for r in results]
    total = sum(1 for r in results for s in chain_mod.segments(tmp_path / "audit" / r.name) for x in lines_of(s)
                if b'"type":"request"' in x)
    assert total == 30_000 and sink.dropped == 0


def test_hostile_content_cannot_forge_structure(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    nasty = ['\n{"prev":"' + "0" * 64 + '","seq":1,"type":"checkpoint"}\n', ',"sig":"' + "A" * 88 + '"}',
             "\u2028\u2029\x00\r\n", '"type":"retention_pruned","through_seq":99', "é" * 5000]
    for i, text in enumerate(nasty):
        sink.put(event(clock, i, prompt=text, request_id=text))
    sink.cycle()
    sink._close_all()
    (r,) = verify_dir(tmp_path / "audit", public)
    assert (r.status, r.records, r.checkpoints) == ("ok", len(nasty) + 2, 2), r.line()
    recs = [orjson.loads(x) for x in lines_of(only_segment_of(tmp_path, "h-w0"))]
    assert [x["prompt"] for x in recs if x["type"] == "request"] == nasty


def test_a_prompt_with_unicode_line_breaks_forges_no_record_for_a_unicode_line_reader(tmp_path: Path, keys) -> None:
    """A reader that splits on every Unicode line break (Python's str.splitlines, log viewers)
    sees the same lines as verify: a prompt holding U+2028, U+2029 or U+0085 around a record
    of its own making stays inside its record, not a line (a record) of its own."""
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    forged = '{"prev":"' + "0" * 64 + '","seq":7,"type":"request","team":"finance","cost_nano":999999999999}'
    for i, brk in enumerate(("\u2028", "\u2029", "\x85")):
        sink.put(event(clock, i, prompt=f"hi{brk}{forged}{brk}there", user=brk))
    sink.cycle()
    sink._close_all()
    text = only_segment_of(tmp_path, "h-w0").read_text()
    assert text.splitlines() == text.split("\n")[:-1]
    assert all(orjson.loads(line)["type"] != "request" or orjson.loads(line)["team"] == "a"
               for line in text.splitlines())
    (r,) = verify_dir(tmp_path / "audit", public)
    assert r.status == "ok", r.line()
    prompts = [x["prompt"] for x in map(orjson.loads, text.split("\n")[:-1]) if x["type"] == "request"]
    assert prompts == [f"hi{b}{forged}{b}there" for b in ("\u2028", "\u2029", "\x85")]


def only_segment_of(tmp: Path, instance: str) -> Path:
    (seg,) = chain_mod.segments(tmp / "audit" / instance / "gateway")
    return seg


def test_a_rotated_key_verifies_with_both_published_keys(tmp_path: Path, keys) -> None:
    signer, public, other = keys
    write_chain(tmp_path, signer, 30)
    write_chain(tmp_path, other, 30)  # restarted with a new key: the chain resumes under it
    st_, msg = status(tmp_path, public)
    assert st_ == "bad" and f"signed by key {other.key_id}, not the published key {signer.key_id}" in msg
    (r,) = verify_dir(tmp_path / "audit", [public, other.public])
    assert r.status == "ok" and r.records == 1 + 30 + 1 + 1 + 30 + 1


def test_segments_rotate_by_age_but_an_idle_chain_does_not_churn(tmp_path: Path, keys) -> None:
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path, segment_seconds=3600), signer, "h-w0", now=clock)
    sink.put(event(clock, 0))
    sink.cycle()
    clock.t += 3601
    sink.cycle()  # the segment is an hour old and holds a record: a new one opens
    clock.t += 3601
    sink.cycle()  # the new one holds only its opening checkpoint: no churn
    sink._close_all()
    segs = chain_mod.segments(tmp_path / "audit" / "h-w0" / "gateway")
    assert [orjson.loads(lines_of(s)[0])["reason"] for s in segs] == ["genesis", "rotate"]
    assert status(tmp_path, public)[0] == "ok"


def test_random_deletes_inserts_swaps_and_duplicates_are_all_detected(tmp_path: Path, keys) -> None:
    """Invariant: any structural change to a sealed chain fails verification (seeded, 300 trials),
    except cutting its final checkpoint, which leaves an unsealed tail that verify reports as
    open (and `--strict` fails): the documented limit of a chain's live end."""
    import random

    signer, public, _ = keys
    write_chain(tmp_path, signer, 60, every=9, segment_bytes=6000)
    segs = chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")
    originals = {s: s.read_bytes() for s in segs}
    rng = random.Random(18)
    for trial in range(300):
        for s, data in originals.items():
            s.write_bytes(data)
        seg = rng.choice(segs)
        ls = lines_of(seg)
        op = rng.choice(["delete", "insert", "swap", "duplicate", "move"])
        i = rng.randrange(len(ls))
        if op == "delete":
            ls.pop(i)
        elif op == "insert":
            ls.insert(i, chain_mod.encode(ls[i][chain_mod.PREV], chain_mod.seq_of(ls[i])[0], {"type": "request"}))
        elif op == "swap" and len(ls) > 1:
            j = rng.randrange(len(ls) - 1)
            ls[j], ls[j + 1] = ls[j + 1], ls[j]
        elif op == "duplicate":
            ls.insert(i, ls[i])
        else:
            other = rng.choice([x for x in segs if x != seg])
            ls.insert(i, rng.choice(lines_of(other)))
        seg.write_bytes(b"".join(x + b"\n" for x in ls))
        if seg.read_bytes() == originals[seg]:
            continue
        (r,) = verify_dir(tmp_path / "audit", public)
        cut_tail = op == "delete" and seg == segs[-1] and i == len(lines_of(seg))
        assert r.status == ("open" if cut_tail else "bad"), (trial, op, seg.name, i, r.line())


def accounted(tmp: Path, instance: str = "h-w0", audit: str = "audit") -> tuple[list[str], int]:
    """(request ids on the record, events the record says were lost) over every chain of one process."""
    recs = [orjson.loads(x) for d in sorted((tmp / audit / instance).iterdir()) if d.is_dir()
            for s in chain_mod.segments(d) for x in lines_of(s)]
    return ([r["request_id"] for r in recs if r["type"] == "request"],
            sum(r["count"] for r in recs if r["type"] == "events_dropped"))


def test_a_chain_directory_replaced_by_a_file_loses_no_event_off_the_record(tmp_path: Path, keys) -> None:
    """Attack: the stream's directory becomes a file (or unwritable) before its chain opens.
    Every event is then on the record or counted in an `events_dropped` record: the event
    the writer was about to append was neither (popped, then lost uncounted, once a second)."""
    signer, _, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    sink.put(event(clock, 0))
    assert sink.safe_cycle() is True
    blocker = tmp_path / "audit" / "h-w0" / "public"
    blocker.write_bytes(b"not a directory")
    for i in range(1, 4):
        sink.put(event(clock, i, tier="public"))
    for _ in range(3):
        assert sink.safe_cycle() is None  # the writer keeps failing, and keeps counting
    blocker.unlink()
    sink.put(event(clock, 4))
    while sink.safe_cycle():
        pass
    sink._close_all()
    ids, lost = accounted(tmp_path)
    assert len(ids) + lost == 5 and {"r0", "r4"} <= set(ids), (ids, lost)


def test_a_deleted_audit_directory_is_noticed_not_written_into_the_void(tmp_path: Path, keys) -> None:
    """Attack: the audit directory is removed (or replaced) under a running writer. Its open
    segment files were unlinked: writing on into them reported records as written that no
    one can read. The writer now notices before it writes, counts the batch as lost, and
    starts the chains again where the directory is, with the loss on the record."""
    signer, _, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    sink.put(event(clock, 0))
    assert sink.safe_cycle() is True
    shutil.rmtree(tmp_path / "audit")
    for i in range(1, 4):
        sink.put(event(clock, i))
    sink.safe_cycle()
    sink.put(event(clock, 4))
    while sink.safe_cycle() is not False:
        pass
    sink._close_all()
    ids, lost = accounted(tmp_path)
    assert "r4" in ids and len(ids) + lost == 4, (ids, lost)  # r0 went with the deleted files


def test_a_loss_noted_while_nothing_can_open_stays_owed_and_counts_only_records(tmp_path: Path, keys) -> None:
    """Attack (seen in CI): the audit directory is moved away and a file put where it was. The
    batch in hand is lost and counted; then the writer, with nothing queued, tried to note the
    loss in a chain it could not open, and marked it noted anyway: those events were neither on
    the record nor counted in it. A checkpoint or the `events_dropped` record lost with a batch
    was also counted as a lost event. Now the loss stays owed until a record of it is written,
    and only records count."""
    signer, _, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    sink.put(event(clock, 0))
    assert sink.safe_cycle() is True
    audit, moved = tmp_path / "audit", tmp_path / "moved"
    audit.rename(moved)
    audit.write_bytes(b"")
    for i in range(1, 4):
        sink.put(event(clock, i))
    clock.t += 60  # an interval checkpoint is due in the batch that fails
    assert sink.safe_cycle() is None
    for _ in range(3):
        assert sink.safe_cycle() is None  # nothing queued, and the loss cannot be noted yet
    audit.unlink()
    sink.put(event(clock, 4))
    while sink.safe_cycle() is not False:
        pass
    sink._close_all()
    assert (accounted(tmp_path, audit="moved"), accounted(tmp_path)) == ((["r0"], 0), (["r4"], 3))


def test_a_chain_cut_right_after_a_checkpoint_is_not_reported_clean(tmp_path: Path, keys) -> None:
    """Attack: cut a stopped chain's file just after one of its interval checkpoints (`head -n`).
    Every line left verifies, and verify said OK although the records after that checkpoint
    and the shutdown checkpoint were gone. Only a chain sealed by its shutdown checkpoint is
    OK now; one that ends at any other checkpoint is OPEN (a live writer, a crash, or a cut)."""
    signer, public, _ = keys
    write_chain(tmp_path, signer, 120, every=50)
    seg = only_segment(tmp_path)
    ls = lines_of(seg)
    assert status(tmp_path, public)[0] == "ok"
    cut = max(i for i, x in enumerate(ls[:-1]) if chain_mod.CHECKPOINT in x)
    seg.write_bytes(b"".join(x + b"\n" for x in ls[:cut + 1]))
    st_, msg = status(tmp_path, public)
    assert st_ == "open" and "checkpoint for 'interval', not 'shutdown'" in msg, msg


def test_a_segment_spliced_in_from_another_replica_is_named_as_such(tmp_path: Path, keys) -> None:
    """Attack: a segment file of another replica's chain (same name, valid signatures) put in
    place of one of ours. Verify failed it, but said our previous record was modified."""
    signer, public, _ = keys
    for inst in ("r1-w0", "r2-w0"):
        clock = Clock()
        sink = AuditSink(settings_for(tmp_path, checkpoint_seconds=10, segment_bytes=3000), signer, inst, now=clock)
        for i in range(40):
            sink.put(event(clock, i))
            clock.t += 1
            sink.cycle()
        sink._close_all()
    ours, theirs = (chain_mod.segments(tmp_path / "audit" / inst / "gateway") for inst in ("r1-w0", "r2-w0"))
    shutil.copy(theirs[1], ours[1])
    results = {r.name: r for r in verify_dir(tmp_path / "audit", public)}
    bad = results["r1-w0/gateway"]
    assert bad.status == "bad" and "belongs to chain 'r2-w0/gateway'" in (bad.problem or ""), bad.line()
    assert results["r2-w0/gateway"].status == "ok"


def test_one_event_that_cannot_be_written_loses_only_itself(tmp_path: Path, keys) -> None:
    """An event JSON cannot hold (an integer past 64 bits, a lone surrogate: checked on the
    way in today, but one slip) failed its whole batch: up to 512 other callers' records lost.
    Now it alone is lost, counted and on the record."""
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path), signer, "h-w0", now=clock)
    for i in range(5):
        sink.put(event(clock, i))
    sink.put(event(clock, 5, cost_nano=2 ** 70))
    sink.put(event(clock, 6, prompt="\ud800"))
    for i in range(7, 10):
        sink.put(event(clock, i))
    sink.safe_cycle()
    sink._close_all()
    ids, lost = accounted(tmp_path)
    assert (ids, lost) == (["r0", "r1", "r2", "r3", "r4", "r7", "r8", "r9"], 2)
    assert status(tmp_path, public)[0] == "ok"


def test_a_deleted_or_cut_tier_chain_is_named_by_the_gateway_chain(tmp_path: Path, keys) -> None:
    """Attack: delete a whole tier's chain directory (hide every `restricted` request), or cut
    its newest segment. Every chain left verified OK: nothing in them knew the other existed.
    The gateway chain's checkpoints now carry each sibling chain's last seq (signed), so
    verify names the missing chain, or the missing records at its end."""
    signer, public, _ = keys
    clock = Clock()
    sink = AuditSink(settings_for(tmp_path, checkpoint_seconds=5, segment_bytes=4000), signer, "h-w0", now=clock)
    for i in range(60):
        sink.put(event(clock, i, tier=("public", "restricted", None)[i % 3]))
        clock.t += 1
        sink.cycle()
    sink._close_all()
    inst = tmp_path / "audit" / "h-w0"
    assert {r.status for r in verify_dir(tmp_path / "audit", public)} == {"ok"}
    restricted = inst / "restricted"
    segs = chain_mod.segments(restricted)
    saved = {s: s.read_bytes() for s in segs}
    segs[-1].unlink()  # its newest segment: the rest ends at a checkpoint, sealed by nothing
    results = {r.name: r for r in verify_dir(tmp_path / "audit", public)}
    cut = results["h-w0/restricted"]
    assert cut.status == "bad" and "the gateway chain" in (cut.problem or ""), cut.line()
    shutil.rmtree(restricted)
    results = {r.name: r for r in verify_dir(tmp_path / "audit", public)}
    gone = results.get("h-w0/restricted")
    assert gone is not None and gone.status == "bad" and "missing" in (gone.problem or ""), results
    restricted.mkdir()
    for s, data in saved.items():
        s.write_bytes(data)
    assert {r.status for r in verify_dir(tmp_path / "audit", public)} == {"ok"}


def test_verify_prints_no_terminal_control_from_the_files(tmp_path: Path, keys) -> None:
    """Attack on the auditor: a checkpoint's `key` (or a chain directory's name) holding ESC
    sequences went raw into verify's text output, to clear or rewrite the auditor's screen
    (a `BAD` line overwritten by an `OK` one). Control characters are printed as U+FFFD."""
    import subprocess
    import sys

    signer, _, _ = keys
    write_chain(tmp_path, signer, 20)
    seg = only_segment(tmp_path)
    data = seg.read_bytes()
    seg.write_bytes(data.replace(f'"key":"{signer.key_id}"'.encode(), b'"key":"\\u001b[1A\\u001b[2KOK"', 1))
    evil = tmp_path / "audit" / "h\x1b[2J-w0" / "gateway"
    shutil.copytree(seg.parent, evil)
    out = subprocess.run([sys.executable, "-m", "gateway_extproc", "audit", "verify", "--dir", str(tmp_path / "audit"),
                          "--public-key", str(tmp_path / "k.pub")], capture_output=True, text=True)
    assert out.returncode == 1 and "BAD" in out.stdout, out.stdout
    assert "\x1b" not in out.stdout and "\ufffd[1A" in out.stdout, out.stdout


def test_a_manifest_dropped_into_a_live_directory_does_not_excuse_deleted_segments(tmp_path: Path, keys) -> None:
    """Attack: delete a chain's oldest segments (hide old records) and drop an empty
    manifest.json beside them: verify took the directory for an export bundle, which may start
    after seq 0, and said OK. A bundle's chains must now be the ones its manifest lists, from
    and to the seqs it names."""
    signer, public, _ = keys
    write_chain(tmp_path, signer, 400, segment_bytes=8192)
    segs = chain_mod.segments(tmp_path / "audit" / "host-w0" / "gateway")
    for seg in segs[:2]:
        seg.unlink()
    (tmp_path / "audit" / "manifest.json").write_bytes(b"{}")
    (r,) = verify_dir(tmp_path / "audit", public)
    assert r.status == "bad" and "manifest" in (r.problem or ""), r.line()
    first = chain_mod.seq_of(lines_of(segs[2])[0])[0]
    (tmp_path / "audit" / "manifest.json").write_bytes(orjson.dumps(
        {"chains": {"host-w0/gateway": {"first_seq": first - 5, "last_seq": None}}}))
    (r,) = verify_dir(tmp_path / "audit", public)
    assert r.status == "bad" and f"starts at seq {first}" in (r.problem or ""), r.line()
