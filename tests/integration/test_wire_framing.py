"""Framing attacks through real Envoy, the ext_proc and the mock provider, beyond
test_wire_attacks.py: HTTP/2 streams whose headers break the protocol, sent on a
connection other callers' answers share.

Invariants: Envoy and the ext_proc worker stay the same processes; a malformed request is
refused for itself alone (never another caller's answer on the same connection); every
answer the gateway makes is OpenAI-shaped with a documented code.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import hpack
import httpx
import hyperframe.frame as hf
import orjson
import pytest

from gateway_extproc import keys
from gateway_extproc.mock_provider import seal

from .conftest import running_gateway
from .test_mtls import MTLS, mtls  # noqa: F401 - the TLS listener's fixture
from .test_wire_attacks import (ATTACK_BUDGET_USD, CHAT, H2, Wire, body, no_stream_left, openai_error,
                                read_response, split_http1)

KEY_IDS = ("h2-malformed", "mix-a", "mix-b")
BIG_BUDGET_USD = 2.0  # mix-a, mix-b: a hundred reservations at once


@pytest.fixture(scope="module")
def framing() -> Iterator[Wire]:
    secrets = {k: keys.generate(k) for k in KEY_IDS}

    def customize(values: dict[str, Any]) -> None:
        values["keys"] += [{"id": k, "sha256": keys.digest(s), "team": "demo", "budget": {"daily": BIG_BUDGET_USD if k.startswith("mix") else ATTACK_BUDGET_USD}}
                           for k, s in secrets.items()]

    with running_gateway("gw-framing-", customize=customize) as gw:
        yield Wire(gw, secrets)


class RawH2(H2):
    """H2 whose outgoing headers are sent as written (h2 would refuse the malformed ones)."""

    def __init__(self, wire: Wire, sock: socket.socket | None = None) -> None:
        super().__init__(wire, sock=sock)
        self.conn.config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                     validate_outbound_headers=False,
                                                     normalize_outbound_headers=False)


# Headers RFC 9113 8.2 makes a request malformed (a stream error), each on an otherwise valid request.
MALFORMED_H2 = {
    "transfer-encoding": (("transfer-encoding", "chunked"),),
    "connection": (("connection", "keep-alive"),),
    "uppercase-name": (("X-Upper", "1"),),
    "crlf-in-value": (("x-note", "a\r\nx-injected: 1"),),
    "unknown-pseudo-header": ((":foo", "x"),),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_H2))
def test_a_malformed_h2_request_spares_the_other_streams_of_its_connection(framing: Wire, case: str) -> None:
    """Envoy's default on an HTTP/2 messaging error is to close the whole connection: one
    malformed request (a `transfer-encoding` or `connection` header, an upper-case name, CR
    LF in a value, an unknown pseudo-header) cut off every other stream on it, another
    caller's answer mid-stream included (a proxy in front multiplexes many callers on one
    connection); that answer was lost, its provider call billed. Now only the malformed
    stream is refused."""
    framing.gw.reset()
    c = RawH2(framing)
    try:
        long = c.request(None, body(stream=True), extra=(
            ("x-mock-sealed", seal({"x-mock-reply-words": "300", "x-mock-chunk-delay-ms": "10"})),))
        c.pump(lambda: long in c.data)  # the neighbour's answer is under way
        bad = c.request("h2-malformed", body(), extra=MALFORMED_H2[case])
        c.pump(lambda: long in c.ended and (bad in c.ended or bad in c.reset), limit_s=30)
        assert not c.closed, "the connection was closed under the other streams"
        after = c.request(None, body())
        c.pump(lambda: after in c.ended)
    finally:
        c.close()
    assert c.status[long] == 200 and long not in c.reset
    assert bytes(c.data[long]).rstrip().endswith(b"data: [DONE]")
    assert bad not in c.status and c.reset[bad] == h2.errors.ErrorCodes.PROTOCOL_ERROR  # RFC 9113 8.1.1
    assert c.status[after] == 200
    assert not [r for r in framing.provider_requests() if "x-injected" in r["headers"]]
    assert framing.settled("h2-malformed") == 0
    no_stream_left(framing)
    framing.watch.alive()


HEADERS_TIMEOUT_S = 10


def frame_kinds(raw: bytes, sid: int) -> set[int]:
    """The kinds of the server's frames on stream `sid`, and of its connection-wide GOAWAY."""
    kinds = set()
    while len(raw) >= 9:
        length, kind, on = int.from_bytes(raw[:3], "big"), raw[3], int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
        if on == sid or kind == 0x7:
            kinds.add(kind)
        raw = raw[9 + length:]
    return kinds


def refused_h2(raw: bytes) -> bool:
    """The server's frames hold an answer to stream 1, a reset of it, or a GOAWAY."""
    return bool(frame_kinds(raw, 1) & {0x1, 0x3, 0x7})  # HEADERS, RST_STREAM, GOAWAY


@pytest.mark.parametrize("version", ["h1", "h2"])
def test_headers_trickled_in_get_408_within_the_headers_timeout(framing: Wire, version: str) -> None:
    """A client that sends its request headers a byte at a time (slowloris) held its
    connection and stream for `envoy.upstreamTimeout` (300 s), every byte resetting nothing:
    Envoy had no limit on the headers alone. The headers must now arrive within 10 s of
    their first byte (Envoy's edge-proxy advice): 408 `request_timeout`, nothing reached the
    ext_proc or a provider."""
    framing.gw.reset()
    sock = socket.create_connection((framing.host, framing.port), timeout=1)
    head = f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer ".encode()
    if version == "h2":  # HEADERS without END_HEADERS, then CONTINUATION frames a second apart
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        headers = hf.HeadersFrame(1, data=hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"),
                                                                  (":path", CHAT), (":authority", "gw")]))
        head = headers.serialize()
        trickle = [hf.ContinuationFrame(1, data=hpack.Encoder().encode([(f"x-h{i}", "v")])).serialize()
                   for i in range(60)]
    else:
        trickle = [b"a"] * 60
    got, started = b"", time.monotonic()
    sock.sendall(head)
    for piece in trickle:  # a piece a second, until the gateway answers or hangs up
        try:
            sock.sendall(piece)
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            break
        got += data
        if not data or (refused_h2(got) if version == "h2" else b"\r\n\r\n" in got):
            break
    waited = time.monotonic() - started
    sock.close()
    assert waited < HEADERS_TIMEOUT_S + 5, (waited, got[:200])
    if version == "h1":
        status, _, answer = split_http1(got)
        assert status == 408 and openai_error(answer)["code"] == "request_timeout", got[:300]
    assert framing.provider_requests() == []
    framing.watch.alive()


# -- the TLS listener (envoy.tls with clientCA, as docs/deploy-kubernetes.md sets it up) -------

def test_a_tls_handshake_left_unfinished_is_closed(mtls: MTLS) -> None:
    """A client that opens a TCP connection to the TLS listener and never finishes the
    handshake (no ClientHello, or half of one) held that connection for Envoy's idle
    timeout (1 h): enough of them fill `envoy.maxConnections` and nobody is served. The
    handshake must now finish within 10 s (`transport_socket_connect_timeout`)."""
    port = mtls.gw.stack.values["envoy"]["listener"]["port"]
    half_hello = bytes.fromhex("160301020001")  # a TLS record header announcing 512 bytes, then nothing
    socks = [socket.create_connection(("127.0.0.1", port), timeout=1) for _ in range(2)]
    socks[1].sendall(half_hello)
    started, open_ = time.monotonic(), set(range(2))
    while open_ and time.monotonic() - started < HEADERS_TIMEOUT_S + 10:
        for i in sorted(open_):
            try:
                if socks[i].recv(4096) == b"":
                    open_.discard(i)
            except socket.timeout:
                pass
            except OSError:
                open_.discard(i)
    for s in socks:
        s.close()
    assert not open_, f"connections {sorted(open_)} still open after {time.monotonic() - started:.0f} s"
    assert mtls.chat("client").status_code == 200
    assert mtls.gw.stack.procs["envoy"].poll() is None



def test_on_the_tls_listener_a_malformed_h2_request_spares_the_other_streams(mtls: MTLS) -> None:
    """The same attack over the mTLS listener (HTTP/2 by ALPN): the neighbour's stream
    ends whole, the malformed one alone is reset."""
    wire = Wire(mtls.gw, {})
    wire.host, wire.port = "127.0.0.1", mtls.gw.stack.values["envoy"]["listener"]["port"]
    context = mtls.context("client")
    context.set_alpn_protocols(["h2"])
    tls = context.wrap_socket(socket.create_connection((wire.host, wire.port), timeout=30), server_hostname="localhost")
    assert tls.selected_alpn_protocol() == "h2"
    c = RawH2(wire, sock=tls)
    try:
        long = c.request(None, body(stream=True), extra=(
            ("x-mock-sealed", seal({"x-mock-reply-words": "300", "x-mock-chunk-delay-ms": "10"})),))
        c.pump(lambda: long in c.data)
        bad = c.request(None, body(), extra=(("transfer-encoding", "chunked"),))
        c.pump(lambda: long in c.ended and (bad in c.ended or bad in c.reset), limit_s=30)
        assert not c.closed
    finally:
        c.close()
    assert c.status[long] == 200 and bytes(c.data[long]).rstrip().endswith(b"data: [DONE]")
    assert c.reset[bad] == h2.errors.ErrorCodes.PROTOCOL_ERROR
    wire.watch.alive()

# -- HTTP/1 framing: smuggling attempts and odd but valid framing -----------------------------

def post(wire: Wire, framing: str, payload: bytes, extra: str = "", key: str | None = None) -> bytes:
    return (f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key or wire.gw.key}\r\n"
            f"Content-Type: application/json\r\n{framing}{extra}\r\n").encode() + payload


def chunked(payload: bytes, ext: bytes = b"") -> bytes:
    return b"%x%s\r\n%s\r\n0\r\n\r\n" % (len(payload), ext, payload)


CL, TE = "Content-Length: {n}\r\n", "Transfer-Encoding: chunked\r\n"
# (headers, body) that Envoy's codec refuses; each body hides a second request a parser
# reading the framing the other way would take for the next one.
SMUGGLED = {
    "two-lengths": (CL + "Content-Length: 5\r\n", "full"),
    "same-length-twice": (CL + CL, "full"),
    "length-list": ("Content-Length: {n}, {n}\r\n", "full"),
    "chunked-then-identity": ("Transfer-Encoding: chunked, identity\r\n", "chunked"),
    "identity-then-chunked": ("Transfer-Encoding: identity, chunked\r\n", "chunked"),
    "gzip-chunked": ("Transfer-Encoding: gzip, chunked\r\n", "chunked"),
    "chunked-twice": (TE + TE, "chunked"),
    "space-before-colon": ("Transfer-Encoding : chunked\r\n" + CL, "full"),
    "chunk-size-overflow": (TE, b"FFFFFFFFFFFFFFFFF5\r\n"),
    "negative-chunk": (TE, b"-5\r\n"),
    "hex-prefix-chunk": (TE, b"0x5\r\n"),
    "bare-lf-chunks": (TE, b"5\nhello\n0\n\n"),
    "negative-length": ("Content-Length: -1\r\n", "full"),
    "plus-length": ("Content-Length: +{n}\r\n", "full"),
    "length-past-2-64": ("Content-Length: 99999999999999999999999\r\n", "full"),
    "nul-in-a-value": (CL + "X-Note: a\x00b\r\n", "full"),
}


@pytest.mark.parametrize("case", sorted(SMUGGLED))
def test_a_smuggling_attempt_is_400_and_nothing_reaches_a_provider(framing: Wire, case: str) -> None:
    """Content-Length against Transfer-Encoding, lists and repeats of either, a `chunked`
    that is not the last coding, sizes that overflow or are no hex: Envoy's codec refuses
    each with 400 `malformed_http` and closes the connection, so the request hidden in the
    body is never read as another one. (Held when tried, 2026-12-05.)"""
    framing.gw.reset()
    payload = body()
    hidden = post(framing, CL.format(n=len(payload)), payload)
    headers, rest = SMUGGLED[case]
    tail = (chunked(payload) + hidden if rest == "chunked" else payload + hidden) if isinstance(rest, str) \
        else rest + hidden
    answers = asyncio.run(_read_all(framing, post(framing, headers.format(n=len(payload)), tail)))
    assert len(answers) == 1, answers
    status, headers_out, answer = answers[0]
    assert status == 400 and openai_error(answer)["code"] == "malformed_http", answer
    assert headers_out.get("connection") == "close"
    assert framing.provider_requests() == []
    framing.watch.alive()


SERVED = {  # framing Envoy reads one way only and serves: one request, one answer
    "upper-case-chunked": ("Transfer-Encoding: CHUNKED\r\n", "chunked", ""),
    "obs-fold-transfer-encoding": ("Transfer-Encoding:\r\n chunked\r\n", "chunked", ""),
    "obs-fold-other-header": (CL, "full", "X-Note: a\r\n b\r\n"),
    "chunk-extensions": (TE, b";a=b;c=\"d\"", ""),
    "chunk-extension-70k": (TE, b";" + b"x" * 70_000, ""),
    "absolute-form-target": (CL, "absolute", ""),
    "bare-cr-in-a-value": (CL, "full", "X-Note: a\rx-injected: 1\r\n"),
}


@pytest.mark.parametrize("case", sorted(SERVED))
def test_odd_but_unambiguous_framing_is_one_request_and_one_answer(framing: Wire, case: str) -> None:
    """Framing Envoy normalises (a folded header, upper-case `CHUNKED`, chunk extensions, an
    absolute-form target, a bare CR in a value) is served as exactly one request: one answer,
    one provider request, nothing injected into the provider's headers. (Held, 2026-12-05.)"""
    framing.gw.reset()
    payload = body()
    headers, rest, extra = SERVED[case]
    raw = post(framing, headers.format(n=len(payload)),
               chunked(payload, rest) if isinstance(rest, bytes) else chunked(payload) if rest == "chunked" else payload,
               extra)
    if rest == "absolute":
        raw = raw.replace(f"POST {CHAT} ".encode(), f"POST http://elsewhere.example{CHAT} ".encode(), 1)
    answers = asyncio.run(_read_all(framing, raw))
    assert [a[0] for a in answers] == [200], answers
    sent = framing.provider_requests()
    assert len(sent) == 1 and "x-injected" not in sent[0]["headers"], sent
    assert not any("\r" in v or "\n" in v for v in sent[0]["headers"].values()), sent
    assert "elsewhere" not in sent[0]["headers"].get("host", "")
    framing.watch.alive()


async def _read_all(wire: Wire, raw: bytes, quiet_s: float = 2.0) -> list[tuple[int, dict[str, str], bytes]]:
    """Every response on the connection until the server closes it or stays quiet."""
    reader, writer = await asyncio.open_connection(wire.host, wire.port)
    out = []
    try:
        writer.write(raw)
        await writer.drain()
        while True:
            try:
                out.append(await asyncio.wait_for(read_response(reader), quiet_s if out else 30))
            except (asyncio.TimeoutError, asyncio.IncompleteReadError):
                return out
    finally:
        writer.close()


def test_pipelined_requests_after_a_refused_one_keep_their_own_identity(framing: Wire) -> None:
    """On one HTTP/1 connection: a request the gateway refuses (a model the key may not use,
    an unknown model) and then requests of two other keys. Each later request is answered
    with its own provider reply, under its own key; a refusal that leaves the body unread
    (invalid JSON) closes the connection instead, so nothing after it is misread.
    (Held, 2026-12-05.)"""
    framing.gw.reset()
    a, b = framing.secrets["mix-a"], framing.secrets["mix-b"]

    def ask(key: str, tag: str, model: str = "default-chat") -> bytes:
        payload = orjson.dumps({"model": model, "max_tokens": 20, "messages": [{"role": "user", "content": tag}]})
        return post(framing, CL.format(n=len(payload)), payload, f"x-mock-sealed: {seal({'x-mock-reply': tag})}\r\n", key)

    raw = ask(framing.gw.restricted_key, "r", "private-chat") + ask(a, "for-a-1") + ask(framing.gw.key, "x", "nope") \
        + ask(b, "for-b-1") + ask(a, "for-a-2")
    answers = asyncio.run(_read_all(framing, raw))
    assert [s for s, _, _ in answers] == [403, 200, 404, 200, 200], answers
    assert [orjson.loads(answers[i][2])["choices"][0]["message"]["content"] for i in (1, 3, 4)] == \
        ["for-a-1", "for-b-1", "for-a-2"]
    owner = {line["request_id"]: line["key_id"] for k, n in (("mix-a", 2), ("mix-b", 1))
             for line in framing.access_lines(k, n)}
    assert [owner[answers[i][1]["x-request-id"]] for i in (1, 3, 4)] == ["mix-a", "mix-b", "mix-a"]
    refused = asyncio.run(_read_all(framing, post(framing, "Content-Length: 5\r\n", b"{nope") + ask(a, "never")))
    assert [(s, h.get("connection")) for s, h, _ in refused] == [(400, "close")]
    framing.watch.alive()


# -- HTTP/2: many callers on one connection, while the ext_proc worker stalls ----------------

def _flood_continuation(wire: Wire) -> int:
    """HEADERS without END_HEADERS, then CONTINUATION frames until Envoy hangs up."""
    sock = socket.create_connection((wire.host, wire.port), timeout=10)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    encoder = hpack.Encoder()
    sock.sendall(hf.HeadersFrame(1, data=encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", CHAT),
                                                          (":authority", "gw")])).serialize())
    sent = 0
    try:
        for i in range(100_000):
            sock.sendall(hf.ContinuationFrame(1, data=encoder.encode([(f"x-flood-{i % 50}", "v" * 100)])).serialize())
            sent += 1
    except OSError:
        pass
    finally:
        sock.close()
    return sent


def test_a_hundred_mixed_callers_on_one_h2_connection_while_the_worker_stalls(framing: Wire) -> None:
    """One HTTP/2 connection carrying 100 concurrent streams of two keys (a proxy in front
    multiplexing callers), each asking the provider for a reply of its own; meanwhile the
    ext_proc worker is stopped (SIGSTOP) for 3 s, another connection floods CONTINUATION
    frames, and another resets streams right after their HEADERS. Every stream gets its
    own reply under its own key; Envoy and the worker stay the same processes.
    (Held, 2026-12-05.)"""
    framing.gw.reset()
    c = H2(framing)
    tags: dict[int, tuple[str, str]] = {}
    try:
        c.pump(lambda: c.conn.remote_settings.max_concurrent_streams == 100, limit_s=10)
        for i in range(100):
            key_id, tag = ("mix-a", "mix-b")[i % 2], f"reply{i:03d}x"
            stream = i % 3 == 0
            sid = c.request(key_id, body(stream=stream, content=tag),
                            extra=(("x-mock-sealed", seal({"x-mock-reply": tag})),))
            tags[sid] = (key_id, tag)
            if i == 30:
                for pid in framing.watch.workers:
                    os.kill(pid, signal.SIGSTOP)
                stopped = time.monotonic()
        assert _flood_continuation(framing) < 100_000  # Envoy hangs up on the flood
        r = H2(framing)
        for _ in range(50):
            sid = r.request(None, None, end=False)
            r.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            r.flush()
        r.close()
        time.sleep(max(0.0, 3 - (time.monotonic() - stopped)))
        for pid in framing.watch.workers:
            os.kill(pid, signal.SIGCONT)
        c.pump(lambda: all(s in c.ended or s in c.reset for s in tags), limit_s=60)
    finally:
        for pid in framing.watch.workers:
            os.kill(pid, signal.SIGCONT)
        c.close()
    assert {s: c.status.get(s) for s in tags} == dict.fromkeys(tags, 200) and not c.reset
    for sid, (_, tag) in tags.items():
        assert tag.encode() in bytes(c.data[sid]), (sid, bytes(c.data[sid])[:200])
        assert len(re.findall(rb"reply\d{3}x", bytes(c.data[sid]))) == 1  # and no one else's
    owner = {line["request_id"]: line["key_id"] for k in ("mix-a", "mix-b") for line in framing.access_lines(k, 50)}
    asked = {r["headers"]["x-request-id"]: r["body"]["messages"][0]["content"] for r in framing.provider_requests()}
    assert sorted(asked.values()) == sorted(tag for _, tag in tags.values())
    key_of = {tag: key_id for key_id, tag in tags.values()}
    assert all(owner[rid] == key_of[tag] for rid, tag in asked.items())  # each charged to its own caller
    no_stream_left(framing)
    framing.watch.alive()


# -- the body limit, to the byte ----------------------------------------------------------------

def exactly(size: int) -> bytes:
    """A valid chat body of exactly `size` bytes (JSON whitespace pads it: few tokens, no budget)."""
    base = orjson.dumps({"model": "default-chat", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
    return base[:-1] + b" " * (size - len(base)) + b"}"


@pytest.mark.parametrize("framing_kind", ["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_is_served_and_one_byte_more_is_413(framing: Wire, framing_kind: str) -> None:
    """envoy.maxRequestBytes is inclusive, whether the body is announced with Content-Length
    or arrives chunked; one byte more is 413 `request_too_large`, nothing sent to a
    provider. (Held, 2026-12-05.)"""
    framing.gw.reset()
    limit = framing.gw.stack.values["envoy"]["maxRequestBytes"]
    auth = {"authorization": f"Bearer {framing.gw.key}", "content-type": "application/json"}
    got = {}
    for size in (limit - 1, limit, limit + 1):
        payload = exactly(size)
        content = payload if framing_kind == "content-length" else \
            iter([payload[i:i + 65536] for i in range(0, size, 65536)])
        resp = httpx.post(f"{framing.gw.url}{CHAT}", content=content, headers=auth, timeout=60)
        got[size - limit] = (resp.status_code, resp.json().get("error", {}).get("code"))
    assert got == {-1: (200, None), 0: (200, None), 1: (413, "request_too_large")}
    assert len(framing.provider_requests()) == 2
    framing.watch.alive()


def test_expect_continue_over_the_limit_is_413_without_the_body(framing: Wire) -> None:
    """`Expect: 100-continue` announcing a body over the limit: the client gets 413
    `request_too_large` without sending it (Envoy answers the 100 itself first, then the
    ext_proc refuses from the Content-Length), and the connection is closed.
    (Held, 2026-12-05.)"""
    framing.gw.reset()
    limit = framing.gw.stack.values["envoy"]["maxRequestBytes"]
    raw = post(framing, f"Content-Length: {limit + 1}\r\n", b"", "Expect: 100-continue\r\n")
    with socket.create_connection((framing.host, framing.port), timeout=10) as sock:
        sock.sendall(raw)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    final = got[got.index(b"HTTP/1.1 4"):] if b"HTTP/1.1 4" in got else got
    status, headers, answer = split_http1(final)
    assert status == 413 and openai_error(answer)["code"] == "request_too_large", got[:300]
    assert headers.get("connection") == "close"
    assert framing.provider_requests() == []


def test_an_hpack_bomb_resets_its_stream_and_spares_the_connection(framing: Wire) -> None:
    """One 3 KB header put in the HPACK dynamic table and referenced 3,000 times (a 9 MB
    header list from 6 KB on the wire): over Envoy's 60 KiB the stream is reset, the
    connection goes on serving. (Held, 2026-12-05.)"""
    framing.gw.reset()
    c = H2(framing)
    try:
        sid = c.conn.get_next_available_stream_id()
        encoder = hpack.Encoder()
        block = encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", CHAT), (":authority", "gw"),
                                ("authorization", f"Bearer {framing.gw.key}"), ("x-bomb", "b" * 3000)])
        block += bytes([0x80 | 62]) * 3000  # indexed field 62: the x-bomb entry, again and again
        c.sock.sendall(hf.HeadersFrame(sid, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        deadline, raw = time.monotonic() + 10, b""
        while not refused_h2(raw) and time.monotonic() < deadline:
            try:
                raw += c.sock.recv(65536)
            except socket.timeout:
                pass
        assert frame_kinds(raw, sid) & {0x3, 0x7} == {0x3}, raw[:200]  # RST_STREAM of it, no GOAWAY
    finally:
        c.sock.close()
    assert framing.provider_requests() == []
    assert framing.normal().status_code == 200
    framing.watch.alive()


def test_http1_clients_that_stop_reading_long_streams_block_no_one(framing: Wire) -> None:
    """Five HTTP/1 clients with a 4 KiB receive buffer that stop reading their long streamed
    answers (back-pressure through TCP): twenty ordinary requests meanwhile are served, and
    a stalled client that reads again later gets its whole stream, ending in `[DONE]`.
    (Held, 2026-12-05.)"""
    framing.gw.reset()
    payload = body(stream=True, max_tokens=4000)
    stalled = []
    try:
        for _ in range(5):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((framing.host, framing.port))
            sock.sendall(post(framing, CL.format(n=len(payload)), payload,
                              f"x-mock-sealed: {seal({'x-mock-reply-words': '20000'})}\r\n", framing.secrets["mix-a"]))
            stalled.append(sock)
        time.sleep(2)  # the answers fill the buffers on the way
        assert [framing.normal().status_code for _ in range(20)] == [200] * 20
        sock, got = stalled[0], b""
        sock.settimeout(30)
        while not got.endswith(b"0\r\n\r\n") and (chunk := sock.recv(1 << 20)):
            got += chunk
    finally:
        for sock in stalled:
            sock.close()
    assert got.startswith(b"HTTP/1.1 200 ") and b"data: [DONE]" in got, got[-300:]
    no_stream_left(framing)
    framing.watch.alive()


def test_no_secret_is_in_a_log_at_the_end(framing: Wire) -> None:
    """After every attack above: no caller key, no provider key in Envoy's or the ext_proc's
    log, no `processing_failed`; Envoy and the worker are the processes the module started."""
    framing.watch.clean_log(framing.watch.new_log())
    logs = framing.gw.logs()
    for secret in (*framing.secrets.values(), framing.gw.restricted_key, framing.gw.primary_key, framing.gw.backup_key):
        assert secret[-16:] not in logs  # random in every key (the provider keys' tails may hold "_")
    framing.watch.alive()
