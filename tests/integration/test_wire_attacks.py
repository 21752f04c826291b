"""Clients that misbehave on the wire, through real Envoy, the ext_proc and the mock provider.

test_hostile_input.py sends hostile *requests* (methods, paths, headers, bodies) and
test_data_plane_stress.py long replies and early leavers; this file attacks the
connection itself: clients that hang up at every phase of a request, HTTP/1 chunked
bodies with trailers, pipelining, `Expect: 100-continue`, Upgrade and CONNECT, bodies
trickled a byte at a time, and HTTP/2 (h2c, what the listener speaks without TLS) with
hundreds of streams on one connection, RST_STREAM mid-body and mid-response, a client
that never reads a long stream, and odd SETTINGS and WINDOW_UPDATE frames.

Invariants, whatever the client does:
- Envoy and the ext_proc worker stay the same processes, and other callers keep being
  served (the ext_proc never wedges);
- every refusal the gateway makes is OpenAI-shaped with a code docs/runbooks.md explains;
- budgets: a request that never reached the provider is charged nothing; one that did is
  charged at most its reservation; no reservation is left behind: each attack runs on a
  key of its own with a small budget, whose settled spend must equal the sum of the costs
  its requests' audit records show (a held reservation would show there, and as refusals);
- every request the ext_proc saw leaves exactly one access line (its stream was closed);
- the ext_proc's and Envoy's memory stay bounded over bursts of such clients.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httpx
import hyperframe.frame as hf
import orjson
import pytest

from gateway_extproc import keys
from gateway_extproc.audit.records import records

from .conftest import REPO, Gateway, running_gateway
from .test_hostile_input import Watch

DOCUMENTED = set(re.findall(r"^### `([a-z_]+)`$", (REPO / "docs" / "runbooks.md").read_text(), re.M))
CHAT = "/v1/chat/completions"
MAX_TOKENS = 200  # default-chat: $20 per M output tokens, so a reservation is ~$0.0041
RESERVATION_USD = 0.0041
# A few reservations: held ones would show as refusals, and in the exact sum. (ROUNDS hang-ups
# whose provider may have worked are each charged their reservation, and the key must then
# still serve one more.)
ATTACK_BUDGET_USD = 0.04
BIG_BUDGET_USD = {"h2-stall": 1.0, "h2-trailers": 0.1}  # many reservations at once
KEY_IDS = ("after-headers", "mid-upload", "provider-thinking", "mid-stream", "after-done", "h2-reset-body",
           "h2-reset-response", "h2-stall", "trailers", "h2-trailers", "slow-body", "pipelined")


def body(stream: bool = False, content: str = "hi", max_tokens: int = MAX_TOKENS) -> bytes:
    return orjson.dumps({"model": "default-chat", "max_tokens": max_tokens, "stream": stream,
                         "messages": [{"role": "user", "content": content}]})


class Wire:
    def __init__(self, gw: Gateway, secrets: dict[str, str]) -> None:
        self.gw, self.secrets, self.watch = gw, secrets, Watch(gw)
        host, port = gw.url.removeprefix("http://").rsplit(":", 1)
        self.host, self.port = host, int(port)

    def head(self, key_id: str, length: int | None = None, chunked: bool = False, extra: str = "") -> bytes:
        framing = "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {length}\r\n"
        return (f"POST {CHAT} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {self.secrets[key_id]}\r\n"
                f"Content-Type: application/json\r\n{framing}{extra}\r\n").encode()

    def spent(self, key_id: str) -> float:
        """The key's spend today: settled charges plus reservations still held."""
        report = httpx.get(f"{self.gw.url}/v1/usage", headers={"authorization": f"Bearer {self.secrets[key_id]}"},
                           timeout=30).json()
        return next(b["spent_usd"] for b in report["budgets"] if b["level"] == f"key:{key_id}"
                    and b["window"] == "daily")

    def settled(self, key_id: str) -> float:
        """The spend once settlements stopped moving (they land in the background)."""
        last, stable = self.spent(key_id), 0
        for _ in range(100):
            time.sleep(0.1)
            now = self.spent(key_id)
            stable = stable + 1 if now == last else 0
            if stable >= 5:
                return now
            last = now
        return last

    def access(self, key_id: str) -> list[dict[str, Any]]:
        lines = self.gw.stack.log_path("extproc").read_text(errors="replace").splitlines()
        out = []
        for line in lines:
            if '"event":"access"' in line and f'"key_id":"{key_id}"' in line:
                rec = orjson.loads(line)
                if rec["path"] == CHAT:  # not the /v1/usage reads of the test
                    out.append(rec)
        return out

    def access_lines(self, key_id: str, count: int) -> list[dict[str, Any]]:
        """Wait (bounded) until `count` access lines of the key are in the log: every stream closed."""
        for _ in range(100):
            found = self.access(key_id)
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return self.access(key_id)

    def charged(self, key_id: str, count: int) -> list[int]:
        """Each request's cost (nano$) from the audit trail, once `count` records are written."""
        root = self.gw.stack.workdir / "audit"
        for _ in range(100):
            found = [r["cost_nano"] for r in records(root, frozenset({"request"})) if r.get("key_id") == key_id
                     and r.get("path") == CHAT]  # not the /v1/usage reads of the test
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return found

    def accounts_exactly(self, key_id: str, count: int, reservation_usd: float = RESERVATION_USD) -> float:
        """The key's settled spend is the sum of what its requests cost, each at most its
        reservation: no reservation was left held, none charged twice."""
        costs = self.charged(key_id, count)
        assert len(costs) == count, costs
        assert all(0 <= c <= reservation_usd * 1e9 for c in costs), costs
        spent = self.settled(key_id)
        assert round(spent * 1e9) == sum(costs), (spent, costs)
        if key_id in BIG_BUDGET_USD:
            return spent
        resp = httpx.post(f"{self.gw.url}{CHAT}", content=body(), timeout=30,
                          headers={"authorization": f"Bearer {self.secrets[key_id]}", "content-type": "application/json"})
        assert resp.status_code == 200, resp.text  # the key goes on working
        return spent

    def normal(self) -> httpx.Response:
        return httpx.post(f"{self.gw.url}{CHAT}", content=body(), timeout=30,
                          headers={"authorization": f"Bearer {self.gw.key}", "content-type": "application/json"})

    def provider_requests(self) -> list[dict[str, Any]]:
        return self.gw.received(self.gw.primary) + self.gw.received(self.gw.backup)


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    secrets = {k: keys.generate(k) for k in KEY_IDS}

    def customize(values: dict[str, Any]) -> None:
        values["keys"] += [{"id": k, "sha256": keys.digest(s), "team": "demo", "budget": {"daily": BIG_BUDGET_USD.get(k, ATTACK_BUDGET_USD)}}
                           for k, s in secrets.items()]

    with running_gateway("gw-wire-", customize=customize) as gw:
        yield Wire(gw, secrets)


def openai_error(raw: bytes) -> dict[str, Any]:
    error = orjson.loads(raw)["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert error["code"] in DOCUMENTED, error
    return error


def split_http1(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, rest


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (content-length or chunked), read as a client would."""
    head = await reader.readuntil(b"\r\n\r\n")
    status, headers, _ = split_http1(head)
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    data = b""
    if headers.get("transfer-encoding") == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            data += await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers, data


# -- clients that hang up at every phase ---------------------------------------------------

ROUNDS = 6


async def _leave(wire: Wire, phase: str) -> None:
    """One request of `phase`, from a client that closes its connection at that point."""
    reader, writer = await asyncio.open_connection(wire.host, wire.port)
    try:
        if phase == "after-headers":
            writer.write(wire.head(phase, length=len(body())))
            await writer.drain()
            await asyncio.sleep(0.2)  # the ext_proc has the headers
        elif phase == "mid-upload":
            payload = body()
            writer.write(wire.head(phase, length=len(payload)) + payload[: len(payload) // 2])
            await writer.drain()
            await asyncio.sleep(0.2)
        elif phase == "provider-thinking":
            seen = len(wire.gw.received(wire.gw.primary))
            writer.write(wire.head(phase, length=len(body()), extra="x-mock-latency-ms: 3000\r\n") + body())
            await writer.drain()
            for _ in range(100):  # until the provider has the request
                if len(wire.gw.received(wire.gw.primary)) > seen:
                    break
                await asyncio.sleep(0.05)
        elif phase in ("mid-stream", "after-done"):
            extra = ("x-mock-reply-words: 300\r\nx-mock-chunk-delay-ms: 20\r\n" if phase == "mid-stream"
                     else "x-mock-reply-words: 3\r\n")
            writer.write(wire.head(phase, length=len(body(stream=True)), extra=extra) + body(stream=True))
            await writer.drain()
            got = b""
            want = b"data: [DONE]" if phase == "after-done" else b"the"
            while got.count(want) < (1 if phase == "after-done" else 5):
                try:  # a refused request (an error reply on a kept-alive connection) would else hang here
                    piece = await asyncio.wait_for(reader.read(65536), 30)
                except TimeoutError:
                    raise AssertionError(f"no stream within 30 s: {got!r}") from None
                assert piece, got
                got += piece
    finally:
        writer.transport.abort()  # RST rather than FIN: as abrupt as a client gets


@pytest.mark.parametrize("phase", ["after-headers", "mid-upload", "provider-thinking", "mid-stream", "after-done"])
def test_a_client_that_hangs_up_is_charged_at_most_its_reservation_and_leaves_none(wire: Wire, phase: str) -> None:
    wire.gw.reset()
    for _ in range(ROUNDS):
        asyncio.run(_leave(wire, phase))
    lines = wire.access_lines(phase, ROUNDS)
    assert len(lines) == ROUNDS, lines  # one line per request: each stream was closed, none wedged
    reached = phase not in ("after-headers", "mid-upload")
    assert len(wire.provider_requests()) == (ROUNDS if reached else 0)
    spent = wire.accounts_exactly(phase, ROUNDS)
    if reached:
        assert spent > 0
    else:  # never reached the provider: not charged
        assert spent == 0, spent
        assert {line["outcome"] for line in lines} == {"incomplete"}
    assert wire.normal().status_code == 200
    wire.watch.alive()


# -- HTTP/1 framing a client may pick ------------------------------------------------------

async def _exchange(wire: Wire, data: bytes, responses: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
    reader, writer = await asyncio.open_connection(wire.host, wire.port)
    try:
        writer.write(data)
        await writer.drain()
        return [await asyncio.wait_for(read_response(reader), 30) for _ in range(responses)]
    finally:
        writer.close()


def test_a_chunked_body_ended_by_trailers_is_served_and_its_stream_ends_as_usual(wire: Wire) -> None:
    """Trailers end the body in Envoy (the ext_proc gets it with end_of_stream false, the
    chart skips trailers); the router's stream still ends with the response body, so it is
    closed as usual (access line `complete`), and the request is charged what it cost. An
    empty body ended by trailers, carrying the client's own route header, is still read (and
    refused) by the ext_proc: it never reaches a provider on the route the client chose."""
    wire.gw.reset()
    payload = body()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (payload[:10], payload[10:]))
    trailers = b"0\r\nx-checksum: abc\r\nx-gateway-model: private-chat\r\n\r\n"
    for _ in range(ROUNDS):
        [(status, _, answer)] = asyncio.run(_exchange(wire, wire.head("trailers", chunked=True) + chunks + trailers))
        assert status == 200, answer
    [(status, _, answer)] = asyncio.run(_exchange(
        wire, wire.head("trailers", chunked=True, extra="x-gateway-model: private-chat\r\n") + trailers))
    assert status == 400 and openai_error(answer)["code"] == "invalid_json"
    sent = wire.provider_requests()
    assert len(sent) == ROUNDS and all(r["body"]["model"] == "mock-gpt-4o-mini" for r in sent)
    lines = wire.access_lines("trailers", ROUNDS + 1)
    assert sorted(line["outcome"] for line in lines) == ["complete"] * (ROUNDS + 1)
    wire.accounts_exactly("trailers", ROUNDS + 1)
    wire.watch.alive()


def test_h2_request_trailers_end_the_body_as_usual(wire: Wire) -> None:
    """The HTTP/2 way to end a body with trailers (HEADERS after DATA, END_STREAM on them).
    With a body: served as usual, each stream closed. Without one (HEADERS, then trailers,
    no DATA) the ext_proc never gets a body message, and the request went on to the route
    Envoy had picked from the client's headers: with `x-gateway-model: private-chat` it
    reached that model's provider, with the gateway's credential, past the key's model
    allow-list and budget (the provider's own 400 came back). The router's headers answer now
    clears the route cache: the request falls to the catch-all route, 404 `unknown_endpoint`."""
    wire.gw.reset()
    c = H2(wire)
    trailers = [("x-checksum", "abc"), ("x-gateway-model", "private-chat")]
    try:
        sids = []
        for _ in range(ROUNDS):
            sid = c.request("h2-trailers", body(), end=False)
            c.conn.send_headers(sid, trailers, end_stream=True)
            sids.append(sid)
        empty = c.request("h2-trailers", None, extra=(("x-gateway-model", "private-chat"),))
        c.conn.send_headers(empty, trailers, end_stream=True)
        c.flush()
        c.pump(lambda: all(s in c.ended for s in (*sids, empty)))
    finally:
        c.close()
    assert [c.status[s] for s in sids] == [200] * ROUNDS
    assert (c.status[empty], openai_error(bytes(c.data[empty]))["code"]) == (404, "unknown_endpoint")
    sent = wire.provider_requests()
    assert len(sent) == ROUNDS and all(r["body"]["model"] == "mock-gpt-4o-mini" for r in sent), sent
    lines = wire.access_lines("h2-trailers", ROUNDS + 1)
    assert sorted(line["outcome"] for line in lines) == ["complete"] * (ROUNDS + 1)
    wire.accounts_exactly("h2-trailers", ROUNDS + 1)
    no_stream_left(wire)


def test_expect_continue_pipelining_and_h2c_upgrade_are_served(wire: Wire) -> None:
    """`Expect: 100-continue` gets its interim answer and then the real one; three requests
    pipelined on one connection get three answers in order; `Upgrade: h2c` is ignored."""
    payload = body()
    async def expect() -> tuple[bytes, tuple[int, dict[str, str], bytes]]:
        reader, writer = await asyncio.open_connection(wire.host, wire.port)
        try:
            writer.write(wire.head("pipelined", length=len(payload), extra="Expect: 100-continue\r\n"))
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            writer.write(payload)
            await writer.drain()
            return interim, await asyncio.wait_for(read_response(reader), 30)
        finally:
            writer.close()
    interim, (status, _, _) = asyncio.run(expect())
    assert interim.startswith(b"HTTP/1.1 100 Continue") and status == 200
    one = wire.head("pipelined", length=len(payload)) + payload
    answers = asyncio.run(_exchange(wire, one * 3, responses=3))
    assert [a[0] for a in answers] == [200] * 3
    assert len({orjson.loads(a[2])["id"] for a in answers}) == 3  # three answers, not one thrice
    h2c = wire.head("pipelined", length=len(payload), extra="Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                    "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n") + payload
    [(status, _, _)] = asyncio.run(_exchange(wire, h2c))
    assert status == 200
    wire.access_lines("pipelined", 5)
    wire.accounts_exactly("pipelined", 5)


UPGRADES = {
    "websocket-get": b"GET /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    "websocket-post": b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 2\r\n",
    "connect": b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n",
}


@pytest.mark.parametrize("case", sorted(UPGRADES))
def test_upgrade_and_connect_are_refused_in_the_openai_shape(wire: Wire, case: str) -> None:
    """A WebSocket upgrade got Envoy's bare 403 with an empty body (no code; `upgrade_failed`);
    it is now 400 `upgrade_not_supported`. CONNECT is an unknown endpoint to the ext_proc."""
    wire.gw.reset()
    auth = f"Authorization: Bearer {wire.gw.key}\r\n\r\n".encode()
    [(status, _, answer)] = asyncio.run(_exchange(wire, UPGRADES[case] + auth + (b"{}" if "post" in case else b"")))
    code = openai_error(answer)["code"]
    assert (status, code) == ((404, "unknown_endpoint") if case == "connect" else (400, "upgrade_not_supported"))
    assert wire.provider_requests() == []
    wire.watch.alive()


def test_a_body_trickled_byte_by_byte_holds_no_reservation_and_spares_others(wire: Wire) -> None:
    """Envoy buffers the body before the ext_proc sees it: while a client trickles its body
    (slowloris), its key holds no reservation and the ext_proc serves everyone else."""
    payload = body()

    async def trickle() -> tuple[int, list[float]]:
        reader, writer = await asyncio.open_connection(wire.host, wire.port)
        seen = []
        try:
            writer.write(wire.head("slow-body", length=len(payload)))
            for i, byte in enumerate(payload):
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(0.02)
                if i % 20 == 0:
                    seen.append(await asyncio.to_thread(wire.spent, "slow-body"))
            status, _, answer = await asyncio.wait_for(read_response(reader), 30)
            return status, seen
        finally:
            writer.close()

    async def others() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            auth = {"authorization": f"Bearer {wire.gw.key}", "content-type": "application/json"}
            got = []
            for _ in range(10):
                batch = await asyncio.gather(*[client.post(f"{wire.gw.url}{CHAT}", content=body(), headers=auth)
                                               for _ in range(10)])
                got += [r.status_code for r in batch]
            return got

    async def both() -> tuple[tuple[int, list[float]], list[int]]:
        return await asyncio.gather(trickle(), others())

    (status, seen), served = asyncio.run(both())
    assert status == 200
    assert seen and set(seen) == {0.0}, seen  # nothing reserved while the body was arriving
    assert served == [200] * 100
    wire.accounts_exactly("slow-body", 1)


# -- HTTP/2 (h2c) ----------------------------------------------------------------------------

class H2:
    """A raw HTTP/2 client on a blocking socket: frames exactly as a test wants them."""

    def __init__(self, wire: Wire, settings: dict[int, int] | None = None, sock: socket.socket | None = None) -> None:
        """`sock`: a connection already open (a TLS one); else a plain one to the gateway."""
        self.wire = wire
        self.sock = sock or socket.create_connection((wire.host, wire.port), timeout=30)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.flush()
        self.status: dict[int, int] = {}
        self.data: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.closed = False

    def flush(self) -> None:
        if data := self.conn.data_to_send():
            self.sock.sendall(data)

    def request(self, key_id: str | None, payload: bytes | None, end: bool = True,
                extra: tuple[tuple[str, str], ...] = ()) -> int:
        sid = self.conn.get_next_available_stream_id()
        secret = self.wire.gw.key if key_id is None else self.wire.secrets[key_id]
        self.conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", CHAT),
                                     (":authority", f"{self.wire.host}:{self.wire.port}"),
                                     ("authorization", f"Bearer {secret}"), ("content-type", "application/json"),
                                     *extra])
        if payload is not None:
            self.conn.send_data(sid, payload, end_stream=end)
        self.flush()
        return sid

    def pump(self, until: Any, read: bool = True, limit_s: float = 60) -> None:
        """Handle frames until `until()` holds (bounded: a wedged gateway fails the test)."""
        deadline = time.monotonic() + limit_s
        while not until() and not self.closed:
            assert time.monotonic() < deadline, ("no progress", self.status, self.ended, self.reset)
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                raw = self.sock.recv(1 << 16)
            except socket.timeout:
                continue
            if not raw:
                self.closed = True
                break
            for ev in self.conn.receive_data(raw):
                if isinstance(ev, h2.events.ResponseReceived):
                    self.status[ev.stream_id] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
                    if read:
                        self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.ended.add(ev.stream_id)
                elif isinstance(ev, h2.events.StreamReset):
                    self.reset[ev.stream_id] = ev.error_code
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    self.closed = True
            self.flush()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self.flush()
        except (OSError, h2.exceptions.ProtocolError):
            pass
        self.sock.close()


def envoy_stat(wire: Wire, name: str) -> int:
    text = httpx.get(f"{wire.gw.stack.admin_url}/stats?filter=^{re.escape(name)}$", timeout=10).text
    return int(text.split(":")[1]) if ":" in text else 0


def no_stream_left(wire: Wire) -> None:
    """Every client request and every ext_proc stream is gone (Envoy's own gauges; bounded
    wait while resets travel): nothing wedged or held."""
    names = ("http.gateway.downstream_rq_active", "cluster.gateway_extproc.upstream_rq_active")
    for _ in range(100):
        if all(envoy_stat(wire, n) == 0 for n in names):
            return
        time.sleep(0.1)
    assert {n: envoy_stat(wire, n) for n in names} == dict.fromkeys(names, 0)


def test_h2_hundreds_of_streams_on_one_connection(wire: Wire) -> None:
    """Envoy advertises at most 100 concurrent streams per connection (its edge default; its
    own default is unbounded), and a client that keeps to it is served on every stream."""
    wire.gw.reset()
    c = H2(wire)
    sids: list[int] = []
    try:
        c.pump(lambda: c.conn.remote_settings.max_concurrent_streams == 100, limit_s=10)  # Envoy's SETTINGS
        for _ in range(3):  # three waves of 100: each as many as the connection allows at once
            wave = [c.request(None, body()) for _ in range(100)]
            c.pump(lambda: all(s in c.ended for s in wave))  # noqa: B023 - pumped before the next wave
            sids += wave
    finally:
        c.close()
    assert [c.status[s] for s in sids] == [200] * 300
    assert len({orjson.loads(bytes(c.data[s]))["id"] for s in sids}) == 300
    no_stream_left(wire)


def test_h2_rst_stream_mid_body_and_mid_response_spares_the_connections_other_streams(wire: Wire) -> None:
    """On one connection: streams reset halfway through their body (never reach the
    provider, never charged) and streams reset after their first reply bytes (charged at
    most the reservation), between ordinary streams that must all be answered."""
    wire.gw.reset()
    payload, streamed = body(), body(stream=True)
    c = H2(wire)
    normal, mid_response = [], []
    try:
        for _ in range(ROUNDS):
            sid = c.request("h2-reset-body", payload[:20], end=False)
            normal.append(c.request(None, payload))
            time.sleep(0.2)  # the ext_proc has the headers (a reset before that never reaches it)
            c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            c.flush()
            sid = c.request("h2-reset-response", streamed,
                            extra=(("x-mock-reply-words", "300"), ("x-mock-chunk-delay-ms", "20")))
            c.pump(lambda: sid in c.data and c.data[sid].count(b"the") >= 3)
            c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            c.flush()
            mid_response.append(sid)
            normal.append(c.request(None, payload))
        c.pump(lambda: all(s in c.ended for s in normal))
    finally:
        c.close()
    assert [c.status[s] for s in normal] == [200] * len(normal)
    assert wire.access_lines("h2-reset-body", ROUNDS) and wire.accounts_exactly("h2-reset-body", ROUNDS) == 0
    assert wire.accounts_exactly("h2-reset-response", ROUNDS) > 0
    no_stream_left(wire)
    wire.watch.alive()


def test_h2_client_that_never_reads_holds_bounded_memory_and_blocks_no_one(wire: Wire) -> None:
    """Ten long streams on a connection whose client advertises a 1-byte window and never
    reads: Envoy pauses the provider once a stream's buffer is full (per-stream limit,
    envoy.maxRequestBytes + 1 MiB), other callers are served meanwhile, and when the client
    goes every reservation is settled (charged at most what was reserved)."""
    wire.gw.reset()
    envoy = wire.gw.stack.procs["envoy"].pid
    before = rss_mib(envoy)
    c = H2(wire, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1})
    try:
        sids = [c.request("h2-stall", body(stream=True, max_tokens=1024), extra=(("x-mock-reply-words", "1024"),))
                for _ in range(10)]
        c.pump(lambda: all(s in c.status for s in sids), read=False)
        served = [wire.normal().status_code for _ in range(20)]
        time.sleep(1)
        held = rss_mib(envoy) - before
        print(f"\nEnvoy RSS with ten unread streams: +{held:.1f} MiB")
    finally:
        c.close()
    assert served == [200] * 20
    assert held < 256, held  # ~10 x a 2000-word stream, never the connection's whole reply
    wire.access_lines("h2-stall", 10)
    assert wire.accounts_exactly("h2-stall", 10, reservation_usd=0.0206) > 0
    no_stream_left(wire)
    wire.watch.alive()


FRAMES = {
    # A WINDOW_UPDATE that overflows the stream's window (RFC 9113 6.9.1: FLOW_CONTROL_ERROR).
    "window-overflow": lambda c, sid: [hf.WindowUpdateFrame(sid, window_increment=2**31 - 1)] * 2,
    "window-zero": lambda c, sid: [hf.WindowUpdateFrame(sid, window_increment=0)],
    "connection-window-overflow": lambda c, sid: [hf.WindowUpdateFrame(0, window_increment=2**31 - 1)] * 2,
    # Window shrunk to 0 mid-stream (the stream stalls), then opened again.
    "settings-odd": lambda c, sid: [hf.SettingsFrame(0, settings={0x1: 0, 0x5: 2**24 - 1, 0x4: 0, 0x99: 7}),
                                    hf.SettingsFrame(0, settings={0x4: 65535})],
    "settings-flood": lambda c, sid: [hf.SettingsFrame(0, settings={0x3: 100})] * 5000,
    "window-shrink-then-huge": lambda c, sid: [hf.SettingsFrame(0, settings={0x4: 0}),
                                               hf.SettingsFrame(0, settings={0x4: 2**31 - 1})],
    "ping-flood": lambda c, sid: [hf.PingFrame(0, opaque_data=b"12345678")] * 5000,
}


@pytest.mark.parametrize("case", sorted(FRAMES))
def test_h2_frame_oddities_hurt_only_their_own_connection(wire: Wire, case: str) -> None:
    """Odd SETTINGS, WINDOW_UPDATE and PING frames, sent raw mid-stream: Envoy may reset
    the stream or close that connection (RFC 9113, its flood protection), but stays up,
    and a caller on another connection is served throughout."""
    wire.gw.reset()
    c = H2(wire)
    try:
        sid = c.request(None, body(stream=True), extra=(("x-mock-reply-words", "200"), ("x-mock-chunk-delay-ms", "5")))
        c.pump(lambda: sid in c.status)
        c.sock.sendall(b"".join(f.serialize() for f in FRAMES[case](c, sid)))
        served = wire.normal().status_code
        try:
            c.pump(lambda: sid in c.ended or sid in c.reset, limit_s=30)
        except (OSError, h2.exceptions.ProtocolError):
            pass  # Envoy closed the connection under us: also fine
    finally:
        c.close()
    assert served == 200
    no_stream_left(wire)
    wire.watch.alive()
    assert httpx.get(f"{wire.gw.stack.admin_url}/ready").status_code == 200


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")



async def _misbehaving_round(wire: Wire) -> list[int]:
    """One burst: HTTP/2 rapid resets, HTTP/1 clients leaving after their headers, streams
    reset mid-reply, and ordinary requests, all at once. Returns the ordinary statuses."""
    payload = body()

    def rapid_resets() -> None:
        for _ in range(8):
            c = H2(wire)
            try:
                for _ in range(50):
                    sid = c.request(None, None, end=False)
                    time.sleep(0.001)
                    c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                    c.flush()
            finally:
                c.close()

    def mid_reply_resets() -> None:
        c = H2(wire)
        try:
            for _ in range(20):
                sid = c.request(None, body(stream=True), extra=(("x-mock-reply-words", "300"),
                                                                ("x-mock-chunk-delay-ms", "5")))
                c.pump(lambda: sid in c.data or sid in c.ended)
                c.conn.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
                c.flush()
        finally:
            c.close()

    async def leave_after_headers(sem: asyncio.Semaphore) -> None:
        async with sem:
            _, writer = await asyncio.open_connection(wire.host, wire.port)
            writer.write(wire.head("after-headers", length=len(payload)).replace(
                wire.secrets["after-headers"].encode(), wire.gw.key.encode()))
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.transport.abort()

    async with httpx.AsyncClient(timeout=60) as client:
        auth = {"authorization": f"Bearer {wire.gw.key}", "content-type": "application/json"}
        sem = asyncio.Semaphore(50)
        results = await asyncio.gather(
            asyncio.to_thread(rapid_resets), asyncio.to_thread(mid_reply_resets),
            *[leave_after_headers(sem) for _ in range(200)],
            *[client.post(f"{wire.gw.url}{CHAT}", content=payload, headers=auth) for _ in range(50)])
    return [r.status_code for r in results if isinstance(r, httpx.Response)]


def test_memory_stays_flat_over_bursts_of_misbehaving_clients(wire: Wire) -> None:
    """RSS of the ext_proc worker and of Envoy after two warm-up bursts, then after six more
    (~3,900 misbehaving clients): a leak of a few KiB per aborted request, a wedged stream
    handler or a held processor would show as tens of MiB. Generous bound, many clients:
    this is about leaks, not about the allocator's noise."""
    worker, envoy = wire.watch.workers[0], wire.gw.stack.procs["envoy"].pid
    for _ in range(2):
        assert asyncio.run(_misbehaving_round(wire)) == [200] * 50
    no_stream_left(wire)
    start = (rss_mib(worker), rss_mib(envoy))
    for _ in range(6):
        assert asyncio.run(_misbehaving_round(wire)) == [200] * 50
    no_stream_left(wire)
    end = (rss_mib(worker), rss_mib(envoy))
    print(f"\nRSS MiB after warm-up -> after 6 bursts: ext_proc {start[0]:.1f} -> {end[0]:.1f}, "
          f"Envoy {start[1]:.1f} -> {end[1]:.1f}")
    assert end[0] - start[0] < 32, (start, end)
    assert end[1] - start[1] < 32, (start, end)
    wire.watch.alive()



def test_hundreds_of_requests_stuck_before_their_body_do_not_wedge_the_ext_proc(wire: Wire) -> None:
    """300 HTTP/1 connections and 500 HTTP/2 streams (five connections of the 100 each may
    open) that sent their headers and nothing more each hold an ext_proc stream (Envoy opened
    it at the headers); meanwhile everyone else is served, and when they go every stream is
    closed, nothing charged."""
    wire.gw.reset()
    head = wire.head("after-headers", length=len(body())).replace(wire.secrets["after-headers"].encode(),
                                                                   wire.gw.key.encode())
    socks = []
    conns: list[H2] = []
    try:
        for _ in range(300):
            s = socket.create_connection((wire.host, wire.port), timeout=30)
            s.sendall(head)
            socks.append(s)
        for _ in range(5):
            c = H2(wire)
            conns.append(c)
            c.pump(lambda: c.conn.remote_settings.max_concurrent_streams == 100, limit_s=10)  # noqa: B023
            for _ in range(100):
                c.request(None, None, end=False)
        conns[-1].pump(lambda: envoy_stat(wire, "cluster.gateway_extproc.upstream_rq_active") >= 700, limit_s=60)
        served = [wire.normal().status_code for _ in range(20)]
    finally:
        for s in socks:
            s.close()
        for c in conns:
            c.close()
    assert served == [200] * 20
    assert len(wire.provider_requests()) == 20  # only the served ones reached a provider
    no_stream_left(wire)
    wire.watch.alive()


# -- timeouts (a gateway of its own with a short envoy.upstreamTimeout) ----------------------

TIMEOUT_S = 4


@pytest.fixture(scope="module")
def quick() -> Iterator[Wire]:
    secrets = {k: keys.generate(k) for k in ("timeouts", "h2-timeout")}

    def customize(values: dict[str, Any]) -> None:
        values["envoy"]["upstreamTimeout"] = f"{TIMEOUT_S}s"
        values["keys"] += [{"id": k, "sha256": keys.digest(s), "team": "demo", "budget": {"daily": ATTACK_BUDGET_USD}}
                           for k, s in secrets.items()]

    with running_gateway("gw-wire-timeouts-", customize=customize) as gw:
        yield Wire(gw, secrets)


async def _stop_sending(wire: Wire, case: str) -> tuple[int, dict[str, str], bytes]:
    payload = body()
    reader, writer = await asyncio.open_connection(wire.host, wire.port)
    try:
        if case == "mid-body":
            writer.write(wire.head("timeouts", length=len(payload)) + payload[:20])
        elif case == "expect":  # announced a body with Expect: 100-continue, then never sent it
            writer.write(wire.head("timeouts", length=len(payload), extra="Expect: 100-continue\r\n"))
        else:
            writer.write(wire.head("timeouts", length=len(payload)))
        await writer.drain()
        if case == "expect":
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
        elif case == "trickle":  # a byte every half second: never idle, never done
            async def trickle() -> None:
                for byte in payload:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.5)
            sender = asyncio.create_task(trickle())
            try:
                return await asyncio.wait_for(read_response(reader), 120)
            finally:
                sender.cancel()
        return await asyncio.wait_for(read_response(reader), 60)
    finally:
        writer.transport.abort()


@pytest.mark.parametrize("case", ["mid-body", "expect", "trickle"])
def test_a_client_too_slow_to_send_its_request_gets_408(quick: Wire, case: str) -> None:
    """A client that stops mid-body (or after `Expect: 100-continue`) got 504
    `upstream_timeout`, "The provider did not answer in time", though no provider was
    asked; one trickling a byte every half second was never timed out at all
    (`request_timeout: 0s`). Both are now 408 `request_timeout`, charged nothing."""
    quick.gw.reset()
    status, headers, answer = asyncio.run(_stop_sending(quick, case))
    assert status == 408, (status, headers, answer)
    assert openai_error(answer)["code"] == "request_timeout", (headers, answer)
    assert quick.provider_requests() == []
    assert quick.settled("timeouts") == 0
    no_stream_left(quick)


def test_an_h2_stream_nobody_reads_ends_at_the_timeout_and_is_settled(quick: Wire) -> None:
    """A long stream whose client never opens its window is not held for ever: Envoy ends
    it at envoy.upstreamTimeout, and its reservation is settled (the gateway charges what
    streamed to Envoy, at most the reservation)."""
    quick.gw.reset()
    c = H2(quick, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1})
    try:
        sid = c.request("h2-timeout", body(stream=True), extra=(("x-mock-reply-words", "200"),
                                                             ("x-mock-chunk-delay-ms", "10")))
        c.pump(lambda: sid in c.reset or sid in c.ended, read=False, limit_s=TIMEOUT_S * 10)
    finally:
        c.close()
    assert sid in c.reset or c.closed
    assert quick.accounts_exactly("h2-timeout", 1) > 0
    no_stream_left(quick)
