"""The error contract, end to end through real Envoy: bad input gets a clear error and loses
nothing.

Every answer of 400 or more, whoever made it (the ext_proc or Envoy's local replies), is
`{"error": {"message", "type", "code", "param"}}` with string message, type and code; the
code has a section in docs/runbooks.md; the status is the one that code is documented with
(errors.CODES for the ext_proc's, the chart's local_reply_config for Envoy's) and `type` is
OpenAI's for that status. No answer, body or header, carries a key: neither one the caller
sent nor a provider's. Envoy and the ext_proc workers stay the same processes, and an
ordinary request right after is served.

tests/integration/test_hostile_input.py hunts crashes and 5xx with wilder requests; this
file pins the shape, status and secrecy of each error, over HTTP/1.1 and HTTP/2.
ERROR_CONTRACT_EXAMPLES raises the example count.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import httpx
import orjson
import pytest
import yaml

from gateway_extproc.errors import CODES, error_type
from gateway_extproc.render import chart_values, render_values

from .conftest import Gateway, running_gateway
from .test_hostile_input import DOCUMENTED, Watch, _unlimited


def _envoy_statuses() -> dict[str, set[int]]:
    """code -> the statuses the chart's local_reply_config answers it with."""
    envoy = yaml.safe_load(render_values(chart_values([]))["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    out: dict[str, set[int]] = {}
    for m in hcm["local_reply_config"]["mappers"]:
        out.setdefault(m["body_format_override"]["json_format"]["error"]["code"], set()).add(m["status_code"])
    return out


ENVOY_STATUSES = _envoy_statuses()
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def contract() -> Iterator[tuple[Gateway, Watch]]:
    with running_gateway("gw-contract-", customize=_unlimited) as gw:
        yield gw, Watch(gw)


def check_error(status: int, headers: list[tuple[str, str]], body: bytes, secrets: list[str], where: str,
                method: str = "POST", provider_said: bool = False) -> str | None:
    """The contract for one answer; the error code, if it is an error. `provider_said`: an
    OpenAI-schema provider's own error, passed on unchanged (docs/runbooks.md): its code is
    the provider's (OpenAI's are often null), the rest of the contract holds."""
    text = body.decode("utf-8", "replace")
    for secret in secrets:
        assert secret not in text, f"a key is in the answer: {where}"
        assert not any(secret in v for _, v in headers), f"a key is in an answer header: {where}"
    if status < 400 or method == "HEAD":
        return None
    content_type = next((v for k, v in headers if k.lower() == "content-type"), "")
    assert content_type.startswith("application/json"), where
    doc = orjson.loads(body)
    assert isinstance(doc, dict) and set(doc) == {"error"}, where
    error = doc["error"]
    assert set(error) == {"message", "type", "code", "param"}, where
    assert error["param"] is None or isinstance(error["param"], str), where
    if provider_said:
        assert isinstance(error["message"], str) and error["message"], where
        return "provider"
    assert all(isinstance(error[f], str) and error[f] for f in ("message", "type", "code")), where
    code = error["code"]
    assert code in DOCUMENTED, where
    if code in CODES and code != "provider_error":
        assert status == CODES[code], where
    elif code in ENVOY_STATUSES:
        assert status in ENVOY_STATUSES[code], where
    assert error["type"] == error_type(status), where
    return str(code)


_CLIENTS: dict[str, httpx.Client] = {}


def client(kind: str) -> httpx.Client:
    """One client per HTTP version for the whole module (a client's TLS setup costs more
    than a request here); each request gets a fresh connection, so none carries state over."""
    if kind not in _CLIENTS:
        _CLIENTS[kind] = httpx.Client(timeout=30, http1=kind == "h1", http2=kind == "h2",
                                      limits=httpx.Limits(max_keepalive_connections=0))
    return _CLIENTS[kind]


def reset(gw: Gateway) -> None:
    for mock in (gw.primary, gw.backup):
        client("h1").post(f"{mock}/_mock/reset").raise_for_status()


def reached(gw: Gateway) -> list[Any]:
    return [r for mock in (gw.primary, gw.backup) for r in client("h1").get(f"{mock}/_mock/requests").json()]


def still_served(gw: Gateway, watch: Watch) -> None:
    ok = client("h1").post(f"{gw.url}/v1/chat/completions", json={"model": "default-chat", "messages": HI},
                           headers={"authorization": f"Bearer {gw.key}"})
    assert ok.status_code == 200, ok.text
    watch.alive()


# -- Envoy's own 400s ---------------------------------------------------------------------

RAW_400 = {  # requests Envoy refuses before any filter: every one used to get an empty or text/plain 400
    "fragment": b"GET /v1/models#x HTTP/1.1\r\nHost: x\r\n\r\n",
    "fragment_post": b"POST /v1/chat/completions?a=1#frag HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    "no_host": b"GET /v1/models HTTP/1.1\r\n\r\n",
    "host_with_space": b"GET /v1/models HTTP/1.1\r\nHost: a b\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(RAW_400))
def test_every_400_envoy_makes_itself_is_openai_shaped(contract: tuple[Gateway, Watch], case: str) -> None:
    """A `#fragment` in the path (path_normalization_failed), no Host (missing_host_header)
    or a Host with a space (http.invalid_authority): Envoy answered 400 with an empty body or
    `Bad Request` in text/plain, no code. The chart maps every 400 of Envoy's to
    `malformed_http`."""
    gw, watch = contract
    gw.reset()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(RAW_400[case])
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), got[:300]
    headers = [tuple(line.decode("latin-1").split(": ", 1)) for line in head.split(b"\r\n")[1:]]
    assert check_error(400, headers, body, [], case) == "malformed_http", got[:400]
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    still_served(gw, watch)


def test_a_fragment_in_an_h2_path_is_openai_shaped(contract: tuple[Gateway, Watch]) -> None:
    gw, watch = contract
    gw.reset()
    host, port = gw.url.removeprefix("http://").rsplit(":", 1)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    status, headers, body, ended = 0, [], b"", False
    with socket.create_connection((host, int(port)), timeout=10) as s:
        conn.initiate_connection()
        conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":path", "/v1/chat/completions#x"),
                              (":authority", f"{host}:{port}"), ("authorization", f"Bearer {gw.key}"),
                              ("content-type", "application/json")])
        conn.send_data(1, orjson.dumps({"model": "default-chat", "messages": HI}), end_stream=True)
        s.sendall(conn.data_to_send())
        while not ended and (raw := s.recv(65536)):
            for ev in conn.receive_data(raw):
                if isinstance(ev, h2.events.ResponseReceived):
                    headers = list(ev.headers)
                    status = int(dict(headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset, h2.events.ConnectionTerminated)):
                    ended = True
            s.sendall(conn.data_to_send())
    assert status == 400, (status, body)
    assert check_error(status, headers, body, [gw.key], "h2 fragment") == "malformed_http"
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    still_served(gw, watch)


def test_the_gateway_is_clean_at_the_end(contract: tuple[Gateway, Watch]) -> None:
    gw, watch = contract
    watch.alive()
    assert httpx.get(f"{gw.stack.admin_url}/ready").status_code == 200
    time.sleep(0.3)
    watch.clean_log(gw.logs())
