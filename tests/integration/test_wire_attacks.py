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
  charged at most its reservation; no reservation is left behind (each attack runs on a
  key whose budget fits one reservation and a half, so a single leaked reservation shows
  as a clamped or refused request afterwards);
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
ATTACK_BUDGET_USD = 0.02  # a few reservations: held ones would show as refusals, and in the exact sum
KEY_IDS = ("after-headers", "mid-upload", "provider-thinking", "mid-stream", "after-done", "h2-reset-body",
           "h2-reset-response", "h2-stall", "trailers", "slow-body", "pipelined")


def body(stream: bool = False, content: str = "hi") -> bytes:
    return orjson.dumps({"model": "default-chat", "max_tokens": MAX_TOKENS, "stream": stream,
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
                out.append(orjson.loads(line))
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
            found = [r["cost_nano"] for r in records(root, frozenset({"request"})) if r.get("key_id") == key_id]
            if len(found) >= count:
                return found
            time.sleep(0.1)
        return found

    def accounts_exactly(self, key_id: str, count: int) -> float:
        """The key's settled spend is the sum of what its requests cost, each at most its
        reservation: no reservation was left held, none charged twice."""
        costs = self.charged(key_id, count)
        assert len(costs) == count, costs
        assert all(0 <= c <= RESERVATION_USD * 1e9 for c in costs), costs
        spent = self.settled(key_id)
        assert round(spent * 1e9) == sum(costs), (spent, costs)
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
        values["keys"] += [{"id": k, "sha256": keys.digest(s), "team": "demo", "budget": {"daily": ATTACK_BUDGET_USD}}
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
                piece = await reader.read(65536)
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
