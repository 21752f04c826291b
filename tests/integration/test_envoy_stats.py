"""Envoy's own metrics through the stats listener (envoy.metrics, templates/_envoy_stats.tpl):
exactly GET /stats/prometheus reaches the loopback admin; nothing else of admin does."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx

from .conftest import Gateway, running_gateway


def stats_url(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.stack.values['envoy']['metrics']['port']}"


def test_stats_listener_serves_prometheus_stats_of_the_extproc_cluster(gateway: Gateway) -> None:
    httpx.post(f"{gateway.url}/v1/chat/completions", timeout=30, headers={"authorization": f"Bearer {gateway.key}"},
               json={"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
    resp = httpx.get(f"{stats_url(gateway)}/stats/prometheus", timeout=10)
    assert resp.status_code == 200
    text = resp.text
    # What the availability alerts read: ext_proc workers' health as Envoy's checks see it.
    processes = gateway.stack.values["extproc"]["processes"]
    assert f'envoy_cluster_membership_healthy{{envoy_cluster_name="gateway_extproc"}} {processes}' in text
    assert f'envoy_cluster_membership_total{{envoy_cluster_name="gateway_extproc"}} {processes}' in text
    assert "envoy_cluster_upstream_rq_xx" in text and "envoy_http_downstream_rq_xx" in text


def test_stats_listener_exposes_nothing_else_of_admin(gateway: Gateway) -> None:
    base = stats_url(gateway)
    for method, path in [("GET", "/"), ("GET", "/config_dump"), ("GET", "/stats"), ("POST", "/quitquitquit"),
                         ("POST", "/drain_listeners"), ("POST", "/stats/prometheus"), ("GET", "/stats/prometheus/x"),
                         ("GET", "/clusters")]:
        resp = httpx.request(method, base + path, timeout=10)
        assert resp.status_code == 404, (method, path, resp.status_code)
    # Envoy is still up and serving (nothing above reached admin).
    assert httpx.get(f"{gateway.stack.admin_url}/ready", timeout=10).status_code == 200


def membership(gw: Gateway) -> tuple[int, int]:
    text = httpx.get(f"{stats_url(gw)}/stats/prometheus", timeout=10).text
    found = dict(re.findall(r'envoy_cluster_membership_(healthy|total)\{envoy_cluster_name="gateway_extproc"\} (\d+)',
                            text))
    return int(found["healthy"]), int(found["total"])


def test_a_hung_worker_shows_in_envoys_health_stats_while_extproc_metrics_stay_up() -> None:
    """GatewayExtProcWorkerUnhealthy's input, for real: SIGSTOP one ext_proc worker."""
    with running_gateway("gw-hung-") as gw:
        deadline = time.monotonic() + 20
        while membership(gw) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert membership(gw) == (1, 1)
        [worker] = children(gw.stack.procs["extproc"].pid)
        os.kill(worker, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 20
            while membership(gw) != (0, 1) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert membership(gw) == (0, 1)
            # The supervisor still serves /metrics: `up` alone would not notice.
            assert httpx.get(gw.stack.metrics_url, timeout=10).status_code == 200
        finally:
            os.kill(worker, signal.SIGCONT)
        deadline = time.monotonic() + 20
        while membership(gw) != (1, 1) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert membership(gw) == (1, 1)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
