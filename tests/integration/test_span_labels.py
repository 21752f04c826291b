"""What a span says about the answer (`gen_ai.response.model`, `gen_ai.response.id`,
`gen_ai.response.finish_reasons`) was read from the provider's bytes before output scanning
rewrote them: a card or an address a provider put in its answer's `model` reached the
collector whole while the client got `[CREDIT_CARD_1]`, and so did one in a finish reason or
an id, in JSON answers and streams, of every backend kind. Spans carry metadata only
(docs/classification.md, "Accountability"): a label holding a value is left off the span."""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator

import httpx
import orjson
import pytest

from .conftest import Gateway, running_gateway
from .test_tracing import Collector, attrs, otlp_collector, wait_for

CARD, EMAIL = "4111111111111111", "jane.doe@example.com"
VALUE = f"card {CARD} {EMAIL}"


@pytest.fixture(scope="module")
def traced() -> Iterator[tuple[Gateway, Collector]]:
    with otlp_collector() as (collector, _, env), running_gateway("gw-labels-", env=env) as gw:
        yield gw, collector


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chat_json(field: str) -> dict:
    choice = {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
    body = {"id": "chatcmpl-a", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice],
            "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}}
    (choice if field == "finish_reason" else body)[field] = VALUE
    return body


def chat_events(field: str) -> list[bytes]:
    def chunk(delta: dict, finish: str | None = None, choices: bool = True, **head: str) -> bytes:
        data = {"id": "chatcmpl-a", "object": "chat.completion.chunk", "created": 1, "model": "m", **head,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []}
        if not choices:
            data["usage"] = {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9}
        return b"data: " + orjson.dumps(data) + b"\n\n"
    head = {field: VALUE} if field in ("model", "id") else {}
    return [chunk({"role": "assistant", "content": ""}, **head), chunk({"content": "ok"}),
            chunk({}, VALUE if field == "finish_reason" else "stop"), chunk({}, choices=False, **head),
            b"data: [DONE]\n\n"]


def anthropic_json() -> dict:
    return {"id": VALUE, "type": "message", "role": "assistant", "model": VALUE,
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 8, "output_tokens": 1}}


CASES = {
    **{f"json-{f}": ("default-chat", False, lambda f=f: {"x-mock-raw-body": b64(orjson.dumps(chat_json(f)))})
       for f in ("model", "finish_reason", "id")},
    **{f"stream-{f}": ("default-chat", True, lambda f=f: {
        "x-mock-raw-events": orjson.dumps([b64(e) for e in chat_events(f)]).decode()})
       for f in ("model", "finish_reason", "id")},
    "anthropic-json": ("claude-chat", False, lambda: {"x-mock-raw-body": b64(orjson.dumps(anthropic_json()))}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_value_in_an_answers_labels_reaches_no_span(traced: tuple[Gateway, Collector], case: str) -> None:
    gw, collector = traced
    gw.reset()
    model, stream, controls = CASES[case]
    trace_id = secrets.token_hex(16)
    r = httpx.post(gw.url + "/v1/chat/completions", timeout=60,
                   json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream},
                   headers={"authorization": f"Bearer {gw.key}", "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
                            **controls()})
    assert r.status_code == 200, r.text
    span = wait_for(lambda: next((s for s in list(collector.spans) if s.trace_id.hex() == trace_id), None))
    assert CARD not in str(span) and EMAIL not in str(span), \
        {k: v for k, v in attrs(span).items() if CARD in str(v) or EMAIL in str(v)}
    if case.startswith(("json-", "stream-")) and not case.endswith("model"):
        assert attrs(span)["gen_ai.response.model"] == "m"  # the answer's clean labels are still there
