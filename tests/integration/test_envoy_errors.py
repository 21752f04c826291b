"""Envoy's own error replies, through real Envoy: OpenAI-shaped, with a code from
docs/runbooks.md, recorded in the access log (the ext_proc's line and Envoy's own)."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway_extproc import keys
from gateway_extproc.render import render_values

from .conftest import Gateway, running_gateway
from .local_cli import children


class ResettingProvider:
    """A TCP peer that reads the request and drops the connection before any response
    byte: with `rst` an abortive close (RST), otherwise a plain close (FIN)."""

    def __init__(self, rst: bool) -> None:
        self.rst = rst
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.settimeout(2)
            try:
                conn.recv(65536)
            except OSError:
                pass
            if self.rst:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def close(self) -> None:
        self.sock.close()


def _with_resetting_models(rst_port: int, fin_port: int) -> Any:
    def customize(values: dict[str, Any]) -> None:
        values["envoy"]["upstreamTimeout"] = "3s"  # the timeout test waits this long
        values["envoy"]["maxRequestBytes"] = 65536  # Envoy's buffers: 64 KiB + 1 MiB
        values["extproc"]["messageTimeout"] = "1s"
        for name, port in (("rst", rst_port), ("fin", fin_port)):
            values["providers"].append({"name": f"{name}-provider", "kind": "openai",
                                        "baseURL": f"http://127.0.0.1:{port}/v1",
                                        "credential": {"env": "MOCK_PROVIDER_API_KEY"}})
            values["models"].append({"name": f"{name}-chat", "tokenizer": "o200k_base", "backends": [
                {"provider": f"{name}-provider", "model": "m", "pricing": {"input": 1.0, "output": 1.0},
                 "maxTier": "internal"}]})
    return customize


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    rst, fin = ResettingProvider(rst=True), ResettingProvider(rst=False)
    try:
        with running_gateway("gw-envoy-errors-", customize=_with_resetting_models(rst.port, fin.port)) as gw:
            yield gw
    finally:
        rst.close()
        fin.close()


def _chat(gw: Gateway, model: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", headers={"Authorization": f"Bearer {gw.key}"},
                      json={"model": model, "messages": [{"role": "user", "content": "Hi"}]}, timeout=30)


def _log_lines(gw: Gateway, request_id: str, event: str) -> list[dict[str, Any]]:
    for _ in range(50):  # Envoy flushes its log every 200 ms
        found = []
        for name in ("extproc", "envoy"):
            for line in gw.stack.log_path(name).read_text(errors="replace").splitlines():
                if request_id in line and line.startswith("{"):
                    doc = json.loads(line)
                    if doc.get("event") == event:
                        found.append(doc)
        if found:
            return found
        time.sleep(0.1)
    return []


@pytest.mark.parametrize("model", ["rst-chat", "fin-chat"])
def test_a_provider_reset_before_headers_is_an_openai_error_with_a_logged_code(gw: Gateway, model: str) -> None:
    resp = _chat(gw, model)
    assert resp.status_code == 502, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert resp.json() == {"error": {"message": "The provider closed the connection before answering.",
                                     "type": "server_error", "code": "upstream_reset", "param": None}}
    request_id = resp.headers["x-request-id"]
    [access] = _log_lines(gw, request_id, "access")  # the ext_proc's line
    assert access["status"] == 502 and access["error_code"] == "upstream_reset"
    [envoy] = _log_lines(gw, request_id, "envoy_error")  # Envoy's own line
    assert envoy["outcome"] == "error" and envoy["error_code"] == "upstream_reset" and envoy["status"] == 502
    assert envoy["details"].startswith("upstream_reset_before_response_started")
    assert envoy["flags"] in ("UC", "UR", "UPE"), envoy


def test_a_model_gateway_yaml_knows_but_envoy_does_not_says_to_rerender(gw: Gateway) -> None:
    """Hot reload reaches the ext_proc at once; Envoy needs a restart for a new model."""
    gateway_yaml = gw.stack.workdir / "gateway.yaml"
    original = gateway_yaml.read_text()
    values = copy.deepcopy(gw.stack.values)
    added = copy.deepcopy(next(m for m in values["models"] if m["name"] == "default-chat"))
    added["name"] = "brand-new-chat"
    values["models"].append(added)
    _write_atomically(gateway_yaml, render_values(values)["gateway.yaml"])
    try:
        deadline = time.monotonic() + 10
        while (resp := _chat(gw, "brand-new-chat")).status_code == 404 and resp.json()["error"]["code"] == \
                "model_not_found" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert resp.status_code == 503, resp.text
        error = resp.json()["error"]
        assert error["code"] == "model_not_deployed" and error["type"] == "server_error"
        assert "'brand-new-chat'" in error["message"] and "re-render envoy.yaml and restart Envoy" in error["message"]
        [access] = _log_lines(gw, resp.headers["x-request-id"], "access")
        assert access["error_code"] == "model_not_deployed"
    finally:
        _write_atomically(gateway_yaml, original)


def test_an_unknown_path_is_still_unknown_endpoint(gw: Gateway) -> None:
    resp = httpx.get(f"{gw.url}/nope", headers={"Authorization": f"Bearer {gw.key}"})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "unknown_endpoint"


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def test_a_provider_slower_than_the_timeout_is_upstream_timeout(gw: Gateway) -> None:
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-private-llama", "latency_ms": 5000,
                                                      "times": 1}).raise_for_status()
    try:
        resp = _chat(gw, "private-chat")
    finally:
        gw.reset()
    assert resp.status_code == 504, resp.text
    assert resp.json()["error"]["code"] == "upstream_timeout"
    [envoy] = _log_lines(gw, resp.headers["x-request-id"], "envoy_error")
    assert envoy["error_code"] == "upstream_timeout" and envoy["flags"] == "UT"


def test_a_provider_response_larger_than_the_buffer_is_upstream_response_too_large(gw: Gateway) -> None:
    # 40 vectors of 3072 floats: about 2.4 MB of JSON, over Envoy's 1.06 MiB buffer here.
    resp = httpx.post(f"{gw.url}/v1/embeddings", headers={"Authorization": f"Bearer {gw.key}"},
                      json={"model": "default-embedding", "input": [f"text {i}" for i in range(40)],
                            "dimensions": 3072}, timeout=30)
    assert resp.status_code == 502, resp.text[:300]
    assert resp.json()["error"]["code"] == "upstream_response_too_large"
    [envoy] = _log_lines(gw, resp.headers["x-request-id"], "envoy_error")
    assert envoy["details"] == "response_payload_too_large"


def test_an_ext_proc_that_does_not_answer_in_time_is_gateway_unavailable(gw: Gateway) -> None:
    """Envoy's own 504 for an ext_proc message timeout is the gateway's fault, not the provider's."""
    workers = children(gw.stack.procs["extproc"].pid)
    secret = keys.generate("in-path")  # a path of the caller's making: only the ext_proc would refuse it
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(2) as pool:
            odd = pool.submit(httpx.post, f"{gw.url}/v1/{secret}/chat?key={secret}", timeout=30,
                              headers={"authorization": f"Bearer {gw.key}"})
            resp = _chat(gw, "private-chat")
            odd_resp = odd.result()
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "gateway_unavailable"
    [envoy] = _log_lines(gw, resp.headers["x-request-id"], "envoy_error")
    assert envoy["error_code"] == "gateway_unavailable" and envoy["details"].startswith("ext_proc_error")
    assert envoy["path"] == "/v1/chat/completions"
    assert odd_resp.status_code == 503
    [odd_line] = _log_lines(gw, odd_resp.headers["x-request-id"], "envoy_error")
    assert odd_line["path"] == "(unknown)"
    assert secret not in gw.stack.log_path("envoy").read_text(errors="replace")


@pytest.mark.parametrize("knob", [{"x-mock-drop-after-chunks": "1"},
                                  {"x-mock-response-headers": json.dumps({"content-length": "5"})}])
def test_a_provider_breaking_off_its_answer_is_never_a_plain_text_reply(gw: Gateway, knob: dict[str, str]) -> None:
    """A provider that sent its headers and then broke the connection (or framed its body
    wrongly) while the gateway still held the answer made Envoy reply in plain text
    (`upstream_reset_after_response_started`, no mapper): now the OpenAI shape, every time."""
    seen = set()
    for _ in range(30):
        try:
            resp = httpx.post(f"{gw.url}/v1/chat/completions", timeout=30, headers={
                "authorization": f"Bearer {gw.key}", **knob},
                json={"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "stream": True})
        except httpx.RemoteProtocolError:  # the answer had started: cut mid-body, as documented
            continue
        seen.add(resp.status_code)
        if resp.status_code != 200:
            assert resp.headers["content-type"].startswith("application/json"), resp.text
            assert resp.json()["error"]["code"] == "upstream_reset"
            assert resp.headers["x-gateway-error-code"] == "upstream_reset"
    assert seen <= {200, 502}
