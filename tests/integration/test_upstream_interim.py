"""A provider's informational answer (1xx) before its real one, on models whose attempts run
the upstream ext_proc.

Envoy 1.40's HTTP/1 codec hands only 100, 102 and 103 to filters as informational headers;
any other 1xx (150, 199) goes through the upstream filter chain as the attempt's response
headers, and the router drops it only after that chain (UpstreamRequest::decodeHeaders). An
upstream ext_proc that held response headers was then asked about the 1xx and, when the 200
came in the same read, about the 200 too: 10-25 % of such requests waited messageTimeout and
got 503 gateway_unavailable; answering both crashed Envoy. The upstream filter now asks
for nothing of the response (docs/architecture.md, "Informational answers").
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from gateway_extproc.mock_provider import seal

from .conftest import Gateway, running_gateway

N = 25  # per status and model: with the old chart, ~5 of them failed


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with running_gateway("interim-") as gateway:
        yield gateway


@pytest.mark.parametrize("http2", [False, True], ids=["http1", "http2"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_nonstandard_1xx_before_the_answer_is_served(gw: Gateway, http2: bool, stream: bool) -> None:
    envoy = gw.stack.procs["envoy"]
    pid = envoy.pid
    outcomes = []
    with httpx.Client(http2=http2, timeout=30) as client:
        for interim in ("150", "199", "150,199"):
            for model in ("fallback-chat", "default-chat"):
                for _ in range(N):
                    resp = client.post(f"{gw.url}/v1/chat/completions", headers={
                        "authorization": f"Bearer {gw.key}", "x-mock-sealed": seal({"x-mock-interim": interim})},
                        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                              "stream": stream})
                    served = resp.status_code == 200 and (
                        resp.text.rstrip().endswith("data: [DONE]") if stream
                        else resp.json()["choices"][0]["message"]["content"].startswith("This is a mock reply"))
                    outcomes.append((interim, model, resp.status_code, served))
    assert [o for o in outcomes if not o[3]] == []
    assert envoy.poll() is None and envoy.pid == pid
