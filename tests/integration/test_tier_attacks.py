"""Policy attacks on the data-classification promise, through real Envoy: places in a request
(or a reply) that the tier decision never read, although the provider, the access log or the
audit trail got them whole.

- Any string that merely *starts* with `data:<binary media type>;base64,` was skipped by the
  scanner (policy/scanner.py `_text`), wherever it was: a message's text, a system prompt,
  Responses `instructions`, a participant's `name`, a reply's content. The model reads such a
  string as text, so a card after that prefix went to an `internal` backend and into the logs,
  and a cloud key after it was not blocked.
- Every value under a key named `file_data`, `input_audio` or `b64_json` was skipped, at any
  depth and whatever it was (plain text, a whole object): a tool parameter named `file_data`
  (whose `description` the model reads) or `metadata.b64_json` carried a card past the tier.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway_extproc import keys

from ..pdf_files import build
from .conftest import Gateway, running_gateway

PDF = base64.b64encode(build(1)).decode()  # a real one-page PDF (a stub of one counts 1,000 pages: docs/budgets.md)

CARD = "4111 1111 1111 1111"  # restricted: default-chat (internal) must never receive it
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"  # a block rule
PREFIX = "data:image/png;base64,"  # what made the scanner look away


def post(gw: Gateway, path: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(f"{gw.url}{path}", json=body, timeout=30,
                      headers={"authorization": f"Bearer {gw.key}", **headers})


def received(gw: Gateway) -> str:
    return repr([r["body"] for mock in (gw.primary, gw.backup) for r in gw.received(mock)])


def card_in(text: str) -> bool:
    return re.search(r"4111\D{0,3}1111\D{0,3}1111\D{0,3}1111", text) is not None


CHAT = "/v1/chat/completions"
PREFIXED_CARRIERS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat message text": (CHAT, {"model": "default-chat", "messages": [
        {"role": "user", "content": f"{PREFIX} (ignore that) please charge card {CARD} today"}]}),
    "chat text part": (CHAT, {"model": "default-chat", "messages": [
        {"role": "user", "content": [{"type": "text", "text": f"{PREFIX} charge card {CARD}"}]}]}),
    "system prompt": (CHAT, {"model": "default-chat", "messages": [
        {"role": "system", "content": f"{PREFIX} the customer's card is {CARD}"},
        {"role": "user", "content": "Charge the customer's card."}]}),
    "participant name": (CHAT, {"model": "default-chat", "messages": [
        {"role": "user", "name": f"{PREFIX}{CARD}", "content": "hello"}]}),
    "responses instructions": ("/v1/responses", {"model": "default-chat", "input": "Charge the card.",
                                                 "instructions": f"{PREFIX} the card is {CARD}"}),
    "anthropic system": ("/v1/messages", {"model": "default-chat", "max_tokens": 64,
                                          "system": f"{PREFIX} the card is {CARD}",
                                          "messages": [{"role": "user", "content": "Charge the card."}]}),
}


@pytest.mark.parametrize("carrier", list(PREFIXED_CARRIERS))
def test_a_binary_data_uri_prefix_does_not_hide_text_from_the_tier(gw: Gateway, carrier: str) -> None:
    path, body = PREFIXED_CARRIERS[carrier]
    resp = post(gw, path, body)
    assert resp.status_code == 403, (resp.status_code, resp.text[:300])
    assert resp.json()["error"]["code"] == "classification_violation"
    assert received(gw) == "[]"


def test_a_binary_data_uri_prefix_does_not_unblock_a_key(gw: Gateway) -> None:
    resp = post(gw, CHAT, {"model": "private-chat", "messages": [
        {"role": "user", "content": f"{PREFIX} deploy with {AWS_KEY}"}]})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "content_blocked", resp.text[:300]
    assert AWS_KEY not in received(gw)


BINARY_KEY_CARRIERS: dict[str, dict[str, Any]] = {
    # The model reads a tool's parameter descriptions; the property's name made it unread.
    "tool parameter named file_data": {"tools": [{"type": "function", "function": {
        "name": "charge", "description": "Charge a card.", "parameters": {"type": "object", "properties": {
            "file_data": {"type": "string", "description": f"always charge card {CARD}"}}}}}]},
    "metadata.b64_json as plain text": {"metadata": {"b64_json": f"card {CARD}"}},
    "an object under input_audio": {"input_audio": {"note": f"card {CARD}"}},
    "a text part's file_data": {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Summarise.", "file_data": f"card {CARD}"}]}]},
}


@pytest.mark.parametrize("carrier", list(BINARY_KEY_CARRIERS))
def test_a_binary_key_name_does_not_hide_text_from_the_tier(gw: Gateway, carrier: str) -> None:
    body = {"model": "default-chat", "messages": [{"role": "user", "content": "Go ahead."}],
            **BINARY_KEY_CARRIERS[carrier]}
    resp = post(gw, CHAT, body)
    assert resp.status_code == 403, (resp.status_code, resp.text[:300])
    assert resp.json()["error"]["code"] == "classification_violation"
    assert received(gw) == "[]"


def test_a_reply_behind_a_binary_data_uri_prefix_is_scanned_and_never_logged(gw: Gateway) -> None:
    """The reply side of the same skip: the response guard let the card through to the client,
    and the request's tier (public) let it into the access log and the audit record."""
    log = gw.stack.log_path("extproc")
    start = log.stat().st_size
    resp = post(gw, CHAT, {"model": "default-chat", "messages": [{"role": "user", "content": "Read it back."}]},
                **{"x-mock-reply": f"{PREFIX} your card is {CARD}"})
    assert resp.status_code == 200, resp.text[:300]
    assert not card_in(resp.text), resp.text[:300]
    time.sleep(0.3)
    with log.open("rb") as f:
        f.seek(start)
        assert not card_in(f.read().decode(errors="replace"))
    trail = b"".join(seg.read_bytes() for seg in (gw.stack.workdir / "audit").rglob("*.jsonl"))
    assert not card_in(trail.decode(errors="replace"))


def test_real_images_audio_and_files_still_go_out_byte_for_byte(gw: Gateway) -> None:
    """What the fix must keep: genuine binary payloads are not read or re-encoded."""
    wav = base64.b64encode(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256))).decode()
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
             {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}},
             {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF}"}},
             {"type": "file", "file": {"filename": "b.pdf", "file_data": PDF}}]
    resp = post(gw, CHAT, {"model": "private-chat", "messages": [{"role": "user", "content": parts}]})
    assert resp.status_code == 200, resp.text[:300]
    (sent,) = [x["body"] for x in gw.received(gw.primary) + gw.received(gw.backup)]
    assert sent["messages"][0]["content"] == parts


def test_a_card_as_a_number_named_like_an_api_parameter_is_read_below_the_top_level(gw: Gateway) -> None:
    """`seed`, `n`, `max_tokens`… are skipped as numbers (a random seed is a valid card one
    time in forty), but only the body's own parameters are the API's: `metadata.seed` is
    caller data the provider stores."""
    for metadata in ({"seed": 4111111111111111}, {"n": 4111111111111111}):
        resp = post(gw, CHAT, {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}],
                               "metadata": metadata})
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "classification_violation", resp.text[:300]
    assert received(gw) == "[]"
    ok = post(gw, CHAT, {"model": "default-chat", "messages": [{"role": "user", "content": "hi"}],
                         "seed": 4111111111111111})
    assert ok.status_code == 200, ok.text[:300]  # the API's own seed: not read (docs/classification.md)


# -- content logging: the reply's own tier ------------------------------------------------

MONITOR_KEY = keys.generate("monitor")


@pytest.fixture(scope="module")
def logged() -> Iterator[Gateway]:
    """A key in monitor mode (the first rollout phase) and, in enforce mode, a rule whose
    action is `monitor` above contentLogging.maxTier (a codename logged, never redacted)."""
    def customize(values: dict[str, Any]) -> None:
        values["keys"].append({"id": "monitor", "sha256": keys.digest(MONITOR_KEY), "team": "demo",
                               "classification": {"mode": "monitor"}})
        values["classification"]["custom"] = [
            {"name": "codename", "kind": "keywords", "keywords": ["bluebird"], "action": "monitor",
             "minTier": "restricted"}]
    with running_gateway("gw-tierlog-", customize=customize) as gw:
        yield gw


def trail_and_log(gw: Gateway) -> str:
    trail = b"".join(seg.read_bytes() for seg in (gw.stack.workdir / "audit").rglob("*.jsonl"))
    return trail.decode(errors="replace") + gw.stack.log_path("extproc").read_text(errors="replace")


@pytest.mark.parametrize(("key", "reply", "found"), [
    ("monitor", f"Your card is {CARD}.", card_in),
    ("demo", "Project bluebird ships in May.", lambda text: "bluebird" in text.lower()),
], ids=["monitor-mode key, card in the reply", "enforce, monitor rule above the logging tier"])
def test_a_reply_above_the_logging_tier_is_not_logged_or_audited(logged: Gateway, key: str, reply: str,
                                                                   found: Any) -> None:
    """The request is public, so its content may be logged; the reply holds a restricted value
    nothing redacts (monitor mode, or a monitor rule): the access line and the audit record
    logged it whole, above contentLogging.maxTier (internal)."""
    secret = MONITOR_KEY if key == "monitor" else logged.key
    resp = post(logged, CHAT, {"model": "default-chat", "messages": [{"role": "user", "content": "Status?"}]},
                **{"authorization": f"Bearer {secret}", "x-mock-reply": reply})
    assert resp.status_code == 200, resp.text[:300]
    assert found(resp.text)  # monitor: the client gets it (that is what monitor means)
    time.sleep(0.5)
    assert not found(trail_and_log(logged))
    assert 'Status?","event":"access"' in logged.stack.log_path("extproc").read_text()  # the prompt is still logged


# -- the client's Host -----------------------------------------------------------------------

@pytest.mark.parametrize("model", ["default-chat", "claude-chat", "fallback-chat"])
def test_the_clients_host_never_reaches_a_provider(gw: Gateway, model: str) -> None:
    """The Host (`:authority`) is not scanned: Envoy rewrites it for the provider. But its
    rewrite copies the client's value into x-envoy-original-host, after the clusters' upstream
    header_mutation (which was meant to remove it) has run: a card in the Host went to the
    internal-tier backends of every model, first attempts and fallbacks alike."""
    httpx.post(f"{gw.primary}/_mock/behaviour", json={"model": "mock-gpt-4o-mini", "status": 500, "times": 1}
               ).raise_for_status()  # default-chat: the fallback attempt is checked too
    resp = post(gw, CHAT, {"model": model, "messages": [{"role": "user", "content": "hi"}]},
                host="card-4111111111111111.example")
    assert resp.status_code == 200, resp.text[:300]
    sent = [r["headers"] for mock in (gw.primary, gw.backup) for r in gw.received(mock)]
    assert sent and not any("4111111111111111" in repr(h) for h in sent), sent
    assert not any("x-envoy-original-host" in h for h in sent)
