"""gateway.yaml hot reload: keys added and revoked without restarting anything, no request
dropped, a broken file rejected while the old config keeps serving."""

from __future__ import annotations

import copy
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx

from gateway_extproc import keys
from gateway_extproc.render import render_values

from .conftest import build_gateway

HELLO = [{"role": "user", "content": "hello"}]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def status(url: str, key: str) -> int:
    return httpx.post(f"{url}/v1/chat/completions", json={"model": "default-chat", "messages": HELLO},
                      headers={"authorization": f"Bearer {key}"}, timeout=10).status_code


def wait_for(check, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the reload did not take effect"
        time.sleep(0.2)


def reload_successful(metrics_url: str) -> float:
    """The pod's genai_gateway_config_last_reload_successful (min over its workers)."""
    text = httpx.get(metrics_url, timeout=5).text
    [value] = [line.split()[1] for line in text.splitlines()
               if line.startswith("genai_gateway_config_last_reload_successful ")]
    return float(value)


def test_keys_reload_without_dropping_traffic_and_bad_files_are_rejected() -> None:
    with tempfile.TemporaryDirectory(prefix="gw-reload-") as tmp:
        gw = build_gateway(Path(tmp))
        gateway_yaml = Path(tmp) / "gateway.yaml"
        try:
            results: list[int] = []
            stop = threading.Event()

            def traffic() -> None:
                while not stop.is_set():
                    results.append(status(gw.url, gw.key))

            worker = threading.Thread(target=traffic)
            worker.start()
            new_key = keys.generate("rotated")
            assert status(gw.url, new_key) == 401
            values = copy.deepcopy(gw.stack.values)
            values["keys"].append({"id": "rotated", "sha256": keys.digest(new_key), "team": "demo"})
            write_atomically(gateway_yaml, render_values(values)["gateway.yaml"])
            wait_for(lambda: status(gw.url, new_key) == 200)
            assert reload_successful(gw.stack.metrics_url) == 1

            write_atomically(gateway_yaml, "version: 1\nlisten: [")  # a broken edit
            wait_for(lambda: reload_successful(gw.stack.metrics_url) == 0)  # /metrics says so
            assert status(gw.url, new_key) == 200  # the last good config keeps serving
            assert '"event":"config_reload_failed"' in gw.stack.log_path("extproc").read_text()

            values["keys"] = [k for k in values["keys"] if k["id"] != "rotated"]
            write_atomically(gateway_yaml, render_values(values)["gateway.yaml"])
            wait_for(lambda: status(gw.url, new_key) == 401)  # revoked
            wait_for(lambda: reload_successful(gw.stack.metrics_url) == 1)  # every worker took it
            stop.set()
            worker.join()
            assert results and set(results) == {200}  # no request of the demo key failed meanwhile
        finally:
            stop.set()
            gw.stack.stop()


def test_a_backend_model_change_reloads_under_traffic() -> None:
    """The ext_proc side of a model change: new requests get the new backend model name,
    requests in flight finish with the old config, none fails."""
    with tempfile.TemporaryDirectory(prefix="gw-reload-model-") as tmp:
        gw = build_gateway(Path(tmp))
        gateway_yaml = Path(tmp) / "gateway.yaml"
        stop = threading.Event()
        results: list[int] = []

        def traffic() -> None:
            while not stop.is_set():
                results.append(httpx.post(f"{gw.url}/v1/chat/completions", timeout=10,
                                          json={"model": "private-chat", "messages": HELLO},
                                          headers={"authorization": f"Bearer {gw.key}"}).status_code)

        worker = threading.Thread(target=traffic)
        try:
            worker.start()
            values = copy.deepcopy(gw.stack.values)
            [model] = [m for m in values["models"] if m["name"] == "private-chat"]
            model["backends"][0]["model"] = "mock-private-llama-v2"
            write_atomically(gateway_yaml, render_values(values)["gateway.yaml"])

            def sent_new_name() -> bool:
                return any(r["body"]["model"] == "mock-private-llama-v2" for r in gw.received(gw.primary))
            wait_for(sent_new_name)
            stop.set()
            worker.join()
            assert results and set(results) == {200}
            assert '"event":"config_reloaded"' in gw.stack.log_path("extproc").read_text()
        finally:
            stop.set()
            gw.stack.stop()
