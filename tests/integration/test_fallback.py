"""Fallback in Envoy as the chart generates it: priorities, retriable statuses, the per-try
latency threshold, outlier ejection, and every backend down."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from .conftest import Gateway, running_gateway

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fb() -> Iterator[Gateway]:
    def customize(values: dict) -> None:
        values["envoy"]["retry"]["perTryTimeout"] = "0.5s"
    with running_gateway("gw-fallback-", customize=customize) as gw:
        yield gw


@pytest.fixture
def gw(fb: Gateway) -> Gateway:
    fb.reset()
    return fb


def ask(gw: Gateway) -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "fallback-chat", "messages": HELLO},
                      headers={"authorization": f"Bearer {gw.key}"}, timeout=30)


def behave(gw: Gateway, **behaviour: object) -> None:
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-primary", **behaviour}).raise_for_status()


@pytest.mark.parametrize("status", [429, 529, 503])
def test_retriable_statuses_fall_back_to_the_secondary(gw: Gateway, status: int) -> None:
    behave(gw, status=status, times=1)
    resp = ask(gw)
    assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    assert resp.headers["x-gateway-attempts"] == "2"


def test_a_primary_slower_than_the_threshold_is_abandoned(gw: Gateway) -> None:
    behave(gw, status=200, latency_ms=3000, times=1)
    started = time.monotonic()
    resp = ask(gw)
    assert resp.status_code == 200 and resp.headers["x-gateway-backend"] == "mock-backup/mock-secondary"
    assert time.monotonic() - started < 2.0  # 0.5 s per-try timeout, not the primary's 3 s


def test_a_failing_primary_is_ejected_and_skipped() -> None:
    with running_gateway("gw-eject-") as gw:  # a fresh, healthy outlier state
        behave(gw, status=500)
        statuses = [ask(gw).status_code for _ in range(8)]
        assert statuses == [200] * 8
        assert len(gw.received(gw.primary)) == 3  # consecutive5xx: then skipped without a try
        assert len(gw.received(gw.backup)) == 8


def test_every_backend_down_is_a_fast_503_in_openai_shape() -> None:
    with running_gateway("gw-down-") as gw:
        for name in [n for n in gw.stack.procs if n.startswith("mock-")]:
            gw.stack.procs[name].terminate()
            gw.stack.procs[name].wait()
        started = time.monotonic()
        resp = ask(gw)
        assert time.monotonic() - started < 2.0
        assert resp.status_code == 503
        assert resp.json()["error"]["code"] == "upstream_unavailable"
