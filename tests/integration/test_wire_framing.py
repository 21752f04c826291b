"""Framing attacks through real Envoy, the ext_proc and the mock provider, beyond
test_wire_attacks.py: HTTP/2 streams whose headers break the protocol, sent on a
connection other callers' answers share.

Invariants: Envoy and the ext_proc worker stay the same processes; a malformed request is
refused for itself alone (never another caller's answer on the same connection); every
answer the gateway makes is OpenAI-shaped with a documented code.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import hpack
import hyperframe.frame as hf
import orjson
import pytest

from gateway_extproc import keys
from gateway_extproc.mock_provider import seal

from .conftest import running_gateway
from .test_mtls import MTLS, mtls  # noqa: F401 - the TLS listener's fixture
from .test_wire_attacks import (ATTACK_BUDGET_USD, CHAT, H2, Wire, body, no_stream_left, openai_error,
                                split_http1)

KEY_IDS = ("h2-malformed",)


@pytest.fixture(scope="module")
def framing() -> Iterator[Wire]:
    secrets = {k: keys.generate(k) for k in KEY_IDS}

    def customize(values: dict[str, Any]) -> None:
        values["keys"] += [{"id": k, "sha256": keys.digest(s), "team": "demo", "budget": {"daily": ATTACK_BUDGET_USD}}
                           for k, s in secrets.items()]

    with running_gateway("gw-framing-", customize=customize) as gw:
        yield Wire(gw, secrets)


class RawH2(H2):
    """H2 whose outgoing headers are sent as written (h2 would refuse the malformed ones)."""

    def __init__(self, wire: Wire) -> None:
        super().__init__(wire)
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


def refused_h2(raw: bytes) -> bool:
    """The server's frames hold an answer to stream 1, a reset of it, or a GOAWAY."""
    while len(raw) >= 9:
        length, kind, sid = int.from_bytes(raw[:3], "big"), raw[3], int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF
        if kind == 0x7 or (sid == 1 and kind in (0x1, 0x3)):  # GOAWAY; HEADERS or RST_STREAM on stream 1
            return True
        raw = raw[9 + length:]
    return False


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
