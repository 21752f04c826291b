"""A JSON chat reply is scanned beyond `choices` (a provider's extra top-level field) and
under the identifiers' names (an object under `id`), as a stream's chunks are (`_extras`).
Identifiers themselves (`id` strings: provider-assigned, not generated text; redacting a
tool call's id would break its round trip) are not read."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.policy.classification import Policy, ResponseGuard
from gateway_extproc.render import chart_values, render_values

ROOT = Path(__file__).resolve().parent.parent
CARD = "4111 1111 1111 1111"


@pytest.fixture(scope="module")
def policy() -> Policy:
    values = chart_values([ROOT / "helm" / "values-local.yaml"])
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    return Policy(cfg.classification)


def answer(**extra: object) -> dict:
    message = {"role": "assistant", "content": "ok", **extra.pop("message", {})}  # type: ignore[dict-item]
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
        {"index": 0, "message": message, "finish_reason": "stop"}], **extra}


@pytest.mark.parametrize("body", [
    answer(provider_note=f"card {CARD}"),
    answer(message={"type": {"x": f"card {CARD}"}}),
    answer(message={"id": {"x": [f"card {CARD}"]}}),
    answer(provider_note={"deep": [f"card {CARD}"]}, message={"content": f"also {CARD}"}),
], ids=["top-level extra", "object under type", "extra and content", "object under id"])
def test_a_json_reply_holds_no_card_anywhere(policy: Policy, body: dict) -> None:
    guard = ResponseGuard(policy, policy._params["enforce"], "demo")
    out = guard.json_body(body)
    sent = repr(body if out is None else out)
    assert "4111 1111" not in sent
    assert out is not None and orjson.loads(out)["choices"][0]["message"]["role"] == "assistant"
