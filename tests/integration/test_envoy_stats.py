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


def test_caller_chosen_values_add_no_envoy_series(gateway: Gateway) -> None:
    """Envoy names stats after some request values when it trusts the client: an
    `x-envoy-upstream-alt-stat-name` of the caller's choosing would be a new stat prefix per
    request, and Host, method, path and user agent feed others. Envoy 1.40 trusts no client
    address by default (no `internal_address_config`: the x-envoy-* headers are removed at
    the edge), so 600 requests with distinct values of each leave Envoy's series as they were."""
    auth = {"authorization": f"Bearer {gateway.key}"}
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

    def send(client: httpx.Client, word: str, kind: int) -> None:
        url = f"{gateway.url}/v1/chat/completions"
        if kind == 0:
            client.post(url, json=body, headers={**auth, "host": f"{word}.example"})
        elif kind == 1:
            client.post(url, json=body, headers={**auth, "x-envoy-upstream-alt-stat-name": word,
                                                 "x-envoy-decorator-operation": word,
                                                 "x-envoy-downstream-service-cluster": word})
        elif kind == 2:
            client.post(url, json=body, headers={**auth, "user-agent": word, "x-client-trace-id": word,
                                                 "x-request-id": word})
        elif kind == 3:
            client.post(f"{gateway.url}/{word}", json=body, headers=auth)
        elif kind == 4:
            client.request(word.upper().replace("-", ""), url, json=body, headers=auth)
        else:
            client.post(url, json=body, headers={**auth, "x-envoy-retry-on": "5xx", "x-envoy-max-retries": "9",
                                                 "x-envoy-upstream-rq-timeout-ms": "1", "x-forwarded-for": word})

    def series() -> set[str]:
        text = httpx.get(f"{stats_url(gateway)}/stats/prometheus", timeout=10).text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line and not line.startswith("#")}

    with httpx.Client(timeout=30) as client:
        for i in range(12):  # every kind once: the series an ordinary request makes exist
            send(client, f"warm-{i}", i % 6)
        series()  # (the stats listener's own cluster, envoy_admin, counts its first scrape)
        before = series()
        for i in range(600):
            send(client, f"zq-{i}-word", i % 6)
    new = series() - before
    assert not [s for s in new if "zq" in s], sorted(new)[:10]
    assert len(new) < 30, sorted(new)
