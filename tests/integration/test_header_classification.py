"""Request headers are classified like the body, through real Envoy: no restricted value
reaches a provider in a header (docs/classification.md, "Request headers")."""

from __future__ import annotations

import httpx

from .conftest import Gateway

CARD = "4111 1111 1111 1111"  # a valid (Luhn) test Visa number: restricted
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # critical: blocks in every mode but monitor


def chat(gw: Gateway, headers: dict[str, str], content: str = "Nothing sensitive here.",
         model: str = "default-chat") -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/chat/completions", timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", **headers},
                      json={"model": model, "messages": [{"role": "user", "content": content}]})


def test_a_card_in_a_header_never_reaches_the_provider(gw: Gateway) -> None:
    for name in ("user-agent", "x-anything"):
        resp = chat(gw, {name: f"client {CARD}"})
        assert resp.status_code == 403, (name, resp.text)
        assert resp.json()["error"]["code"] == "classification_violation" and "4111" not in resp.text
    assert gw.received(gw.primary) == [] and gw.received(gw.backup) == []
