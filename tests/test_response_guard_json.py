"""A JSON chat reply is scanned beyond `choices` (a provider's extra top-level field) and
under the identifiers' names (an object under `id`), as a stream's chunks are (`_extras`).
Identifiers inside the choices (a tool call's `id`: provider-assigned, and redacting it would
break its round trip) are not read; the answer's own `id` is (tests/test_response_ids.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.policy.classification import Policy, ResponseGuard
from gateway_extproc.render import chart_values, render_values

from .test_response_ids import scans  # noqa: F401 (a fixture: every list of strings the scanner reads)

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


def test_an_answers_labels_are_read_once_per_value(policy: Policy, scans: Any) -> None:
    """`model` and the other labels repeat on every answer, so a value seen in a clean answer
    is not read again, while a new value is (a card there is still caught). The answer's
    `id` is read apart, every time (tests/test_response_ids.py)."""
    seen = scans
    fresh = Policy(policy.cfg)
    guard = lambda: ResponseGuard(fresh, fresh._params["enforce"], "demo")  # noqa: E731
    assert guard().json_body(answer(id="chatcmpl-0000000000000000000000000001", model="gpt-x-2024-07-18")) is None
    assert "gpt-x-2024-07-18" in seen[-2] and "ok" in seen[-2] and not any("chatcmpl" in t for t in seen[-2])
    assert seen[-1] == ["chatcmpl-0000000000000000000000000001"]
    assert guard().json_body(answer(model="gpt-x-2024-07-18")) is None
    assert seen[-2:] == [["ok"], ["chatcmpl-1"]]
    out = guard().json_body(answer(model=f"gpt {CARD}"))
    assert out is not None and "4111 1111" not in out.decode()


def test_a_matched_stop_string_is_scanned_like_any_answer_text(policy: Policy) -> None:
    """The pivot's `stop_reason` (the stop string matched, which an Anthropic client gets as
    `stop_sequence`) is provider output: a provider could put anything there."""
    body = answer()
    body["choices"][0].update(native_finish_reason="stop_sequence", stop_reason=f"card {CARD}")
    out = ResponseGuard(policy, policy._params["enforce"], "demo").json_body(body)
    assert out is not None and "4111 1111" not in out.decode()
    assert orjson.loads(out)["choices"][0]["native_finish_reason"] == "stop_sequence"
