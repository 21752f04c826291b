"""Supervision and fail-fast start-up, through real processes.

`serve` restarts a worker that dies while Envoy keeps serving; `local` never leaves a
process behind and says which part died and why; start-up problems (a busy port, a bad
config, Envoy exiting) are reported within seconds with the cause on stderr.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from gateway_extproc.localstack import free_port
from tests.redis_server import RedisServer

from .conftest import running_gateway
from .local_cli import VALUES_LOCAL, children, cmdline, free_ports_values, processes_mentioning, start_local

BIN = Path(sys.executable).parent / "gateway-extproc"
CHAT = {"model": "default-chat", "messages": [{"role": "user", "content": "Hi"}]}


def _chat(url: str, key: str) -> int:
    try:
        return httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"},
                          timeout=5).status_code
    except httpx.HTTPError:
        return 0


def test_a_killed_worker_is_restarted_and_traffic_recovers_within_2s() -> None:
    with RedisServer() as redis:
        def two_workers(values: dict) -> None:
            values["extproc"]["processes"] = 2
            values["budgets"]["store"] = "redis"
            values["budgets"]["redis"] = {"url": redis.url}

        with running_gateway("gw-sup-", customize=two_workers) as gw:
            serve = gw.stack.procs["extproc"].pid
            workers = children(serve)
            assert len(workers) == 2 and all("serve-one" in cmdline(w) for w in workers)
            assert _chat(gw.url, gw.key) == 200
            from .test_metrics import sample
            counted = sample(httpx.get(gw.stack.metrics_url).text, "genai_requests_total", team="demo")
            assert counted >= 1
            os.kill(workers[0], signal.SIGKILL)
            killed_at = time.monotonic()
            statuses = []
            while (since := time.monotonic() - killed_at) < 2.0:
                statuses.append((round(since, 2), _chat(gw.url, gw.key)))
                time.sleep(0.02)
            # Envoy's health check takes the dead socket out of rotation within 0.5 s: the
            # survivor serves everything from then on, before the restarted worker is back.
            assert all(status == 200 for since, status in statuses if since >= 1.0), statuses
            after = [_chat(gw.url, gw.key) for _ in range(30)]
            assert after == [200] * 30, after
            print(f"during the 2 s after the kill (s, status): {statuses}")
            deadline = time.monotonic() + 10
            while len(children(serve)) < 2 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(children(serve)) == 2 and workers[0] not in children(serve)
            metrics = httpx.get(gw.stack.metrics_url).text
            assert "genai_gateway_extproc_worker_restarts_total 1.0" in metrics
            # The dead worker's scraped counts stay in the totals: no counter reset.
            assert sample(metrics, "genai_requests_total", team="demo") >= counted + 30
            log = gw.stack.log_path("extproc").read_text()
            assert '"event":"extproc_worker_died"' in log and "was killed by SIGKILL" in log


def _leftovers(tmp: Path, ports_file: Path) -> list[str]:
    ports = [str(p) for p in _mock_ports(ports_file)]
    found = processes_mentioning(str(tmp))
    for port in ports:
        found += [p for p in processes_mentioning(f"--port {port} ") if "mock-provider" in p]
    return found


def _mock_ports(ports_file: Path) -> set[int]:
    values = yaml.safe_load(ports_file.read_text())
    return {int(p["baseURL"].split(":")[2].split("/")[0]) for p in values["providers"]}


def test_killing_serve_under_local_stops_everything_with_the_reason(tmp_path: Path) -> None:
    ports = free_ports_values(tmp_path)
    local = start_local(BIN, [ports], tmp_path / "run")
    serve = local.child("gateway-extproc serve")
    workers = children(serve)
    assert workers
    os.kill(serve, signal.SIGKILL)
    rc = local.proc.wait(timeout=20)
    err = local.proc.stderr.read()
    assert rc != 0
    assert f"extproc (pid {serve}) was killed by SIGKILL" in err and "run/extproc.log" in err, err
    deadline = time.monotonic() + 10
    while (left := _leftovers(tmp_path, ports)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []
    # The next start works: stale sockets are removed, not mistaken for a live gateway.
    again = start_local(BIN, [ports], tmp_path / "run")
    try:
        assert _chat(again.url, "gwk_demo_local-only-demo-key-not-for-production") == 200
    finally:
        rc, err = again.stop()
    assert rc == 0, err
    assert _leftovers(tmp_path, ports) == []


def test_sigkill_of_local_leaves_no_process(tmp_path: Path) -> None:
    ports = free_ports_values(tmp_path)
    local = start_local(BIN, [ports], tmp_path / "run")
    local.proc.kill()
    local.proc.wait()
    deadline = time.monotonic() + 15
    while (left := _leftovers(tmp_path, ports)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == []


def _local_fails(tmp: Path, *values: Path) -> tuple[float, str]:
    argv = [str(BIN), "local", "--workdir", str(tmp / "run")]
    for v in [VALUES_LOCAL, *values]:
        argv += ["--values", str(v)]
    started = time.monotonic()
    done = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    return took, done.stderr


def test_port_in_use_fails_in_under_3s_naming_the_port(tmp_path: Path) -> None:
    ports = free_ports_values(tmp_path)
    busy = yaml.safe_load(ports.read_text())["envoy"]["listener"]["port"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", busy))
        s.listen()
        took, err = _local_fails(tmp_path, ports)
    assert took < 3, took
    assert f"error: port {busy} (envoy.listener.port) is in use" in err, err


def test_a_second_local_on_the_same_sockets_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    first = free_ports_values(tmp_path / "a")
    local = start_local(BIN, [first], tmp_path / "a" / "run")
    try:
        (tmp_path / "b").mkdir()
        second = free_ports_values(tmp_path / "b")
        same_sockets = tmp_path / "b" / "same-sockets.yaml"
        same_sockets.write_text(yaml.safe_dump({"extproc": {"socketDir": str(tmp_path / "a" / "sock")}}))
        took, err = _local_fails(tmp_path / "b", second, same_sockets)
        assert took < 3, took
        assert f"error: another gateway is using {tmp_path / 'a' / 'sock'}/extproc-0.sock" in err, err
        assert _chat(local.url, "gwk_demo_local-only-demo-key-not-for-production") == 200  # the first one is unharmed
    finally:
        local.stop()


def test_bad_config_fails_in_under_3s_naming_file_and_key(tmp_path: Path) -> None:
    ports = free_ports_values(tmp_path)
    bad = tmp_path / "bad.yaml"
    values = yaml.safe_load((Path(__file__).resolve().parents[2] / "helm" / "values-local.yaml").read_text())
    keys = values["keys"]
    keys[1]["team"] = "demoo"
    bad.write_text(yaml.safe_dump({"keys": keys}))
    took, err = _local_fails(tmp_path, ports, bad)
    assert took < 3, took
    assert "keys[1].team is 'demoo', not in teams" in err, err
    assert err.count("\n") == 1, err  # one line


def test_envoy_exiting_at_start_is_reported_with_its_log(tmp_path: Path) -> None:
    ports = free_ports_values(tmp_path)
    unbindable = tmp_path / "unbindable.yaml"
    # TEST-NET-1: no interface here has it, so Envoy cannot bind its listener and exits.
    unbindable.write_text(yaml.safe_dump({"envoy": {"listener": {"address": "192.0.2.1"}}}))
    _, err = _local_fails(tmp_path, ports, unbindable)
    # The mocks and the ext_proc start first; what counts is the time from Envoy's last word.
    reported_after = time.time() - (tmp_path / "run" / "envoy.log").stat().st_mtime
    assert reported_after < 2, reported_after
    assert "error: envoy (pid" in err and "exited with code" in err and "run/envoy.log" in err, err
    assert "192.0.2.1" in err, err


def test_envoy_crashing_under_local_is_restarted_with_the_reason(tmp_path: Path) -> None:
    ports = free_ports_values(tmp_path)
    local = start_local(BIN, [ports], tmp_path / "run")
    try:
        envoy = local.child("/envoy -c")
        os.kill(envoy, signal.SIGSEGV)  # what issue 11's crash looks like
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _chat(local.url, "gwk_demo_local-only-demo-key-not-for-production") == 200 and local.child("/envoy -c") != envoy:
                break
            time.sleep(0.2)
        served = _chat(local.url, "gwk_demo_local-only-demo-key-not-for-production")
    finally:
        rc, err = local.stop()
    assert served == 200, err
    assert f"warning: envoy (pid {envoy}) was killed by SIGSEGV; last lines of" in err, err
    assert "warning: restarting envoy" in err and "envoy is up again" in err
    assert rc == 0, err
