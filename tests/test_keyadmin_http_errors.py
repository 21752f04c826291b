"""The key admin API's HTTP server (keyadmin.start) keeps the error contract: whatever a
caller sends, the answer is the OpenAI error shape with a code docs/runbooks.md explains and
the status errors.CODES gives it, never the request quoted back, and a refused call changes
nothing. (tests/test_keyadmin.py drives AdminApp without HTTP.)"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
import yaml

from gateway_extproc import config, keyadmin, keys
from gateway_extproc.errors import CODES
from gateway_extproc.localstack import free_port

from .test_keyadmin import RAW, TOKEN

DOCUMENTED = set(re.findall(r"^### `([a-z_]+)`$", (Path(__file__).resolve().parents[1] / "docs" / "runbooks.md")
                            .read_text(), re.M))
SECRET = "gwk_leak_" + keys.generate("x")[-24:]
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def admin(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    raw = {**RAW, "identity": {"keyAdmin": {"enabled": True, "address": "127.0.0.1", "port": port,
                                            "file": str(tmp_path / "keys.json"),
                                            "admins": [{"name": "root", "sha256": keys.digest(TOKEN)}]}}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(raw))
    server = keyadmin.start(str(path), config.load(str(path)))
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def error_of(status: int, content_type: str, body: bytes) -> str:
    assert content_type.startswith("application/json"), (status, body[:300])
    doc = orjson.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "code", "param"}, doc
    code = doc["error"]["code"]
    assert code in DOCUMENTED and CODES[code] == status, (status, doc)
    assert SECRET not in body.decode("utf-8", "replace")
    return str(code)


@pytest.mark.parametrize("method", ["PUT", "OPTIONS", "TRACE", "FOO", "PROPFIND"])
def test_every_method_gets_an_openai_shaped_answer(admin: str, method: str) -> None:
    """Only GET, POST, PATCH and DELETE had handlers: anything else got http.server's 501 page
    in text/html."""
    r = httpx.request(method, f"{admin}/admin/keys", headers=AUTH)
    assert error_of(r.status_code, r.headers["content-type"], r.content) == "method_not_allowed"


def test_head_gets_the_status_and_no_body(admin: str) -> None:
    r = httpx.head(f"{admin}/admin/keys", headers=AUTH)
    assert r.status_code == 405 and r.content == b""


@pytest.mark.parametrize(("body", "code"), [
    (b"[" * 20_000, "invalid_json"),  # RecursionError: a 503 key_store_unavailable, which clients retry
    (b'{"team": "search", "id": "k", "owner": "\\ud800"}', "invalid_json"),
    (b'{"team": "search", "id": "k", "owner": "\xff"}', "invalid_encoding"),
    (b'{"team": "search", "id": "k", "id": "k"}', "invalid_json"),
])
def test_a_body_no_store_can_hold_is_refused_and_creates_nothing(admin: str, body: bytes, code: str) -> None:
    """A lone surrogate escape in `owner` was accepted: the key was written, then the audit
    line could not be encoded, and the caller got 503 key_store_unavailable without the key's
    secret; its retry met 409 key_conflict. The key existed and nobody held it."""
    r = httpx.post(f"{admin}/admin/keys", headers=AUTH, content=body)
    assert error_of(r.status_code, r.headers["content-type"], r.content) == code
    assert httpx.get(f"{admin}/admin/keys/k", headers=AUTH).status_code == 404
    retry = httpx.post(f"{admin}/admin/keys", headers=AUTH, json={"team": "search", "id": "k", "owner": "ok"})
    assert retry.status_code == 201, retry.text


def test_a_body_over_64_kib_is_413_not_a_truncated_parse(admin: str) -> None:
    """The server read the first 64 KiB of a larger body and parsed that: 400 invalid_json,
    about JSON the caller never sent."""
    body = orjson.dumps({"team": "search", "id": "big", "owner": "o" * 70_000})
    r = httpx.post(f"{admin}/admin/keys", headers=AUTH, content=body)
    assert error_of(r.status_code, r.headers["content-type"], r.content) == "request_too_large"
    assert httpx.get(f"{admin}/admin/keys/big", headers=AUTH).status_code == 404


@pytest.mark.parametrize(("raw", "code"), [
    (f"GARBAGE {SECRET}\r\n\r\n".encode(), "invalid_request"),
    (f"GET /admin/keys?k={SECRET} HTTP/9.9\r\nHost: x\r\n\r\n".encode(), "invalid_request"),
    (b"GET /admin/keys HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n", "request_headers_too_large"),
    (b"GET /admin/keys?" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "request_headers_too_large"),
])
def test_a_request_the_server_cannot_parse_is_openai_shaped_and_not_quoted(admin: str, raw: bytes, code: str) -> None:
    """http.server answered these with an HTML page quoting the request line (a key in the
    query string included)."""
    host, port = admin.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw)
        got = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (chunk := s.recv(65536)):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    content_type = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")[1:]
                         if line.lower().startswith(b"content-type:")), "")
    assert error_of(status, content_type, body) == code, got[:400]
    assert httpx.get(f"{admin}/admin/keys", headers=AUTH).status_code == 200
