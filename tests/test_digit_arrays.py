"""A card or SSN sent as a JSON array of its digits or groups (`[4,1,1,…]`, `[4111, 1111,
1111, 1111]`, `"ssn": [123, 45, 6789]`) is the value it spells: until 2026-12-05 each number of
the array was read alone (none is nine digits long), so the card reached the provider from
metadata, a tool schema's `enum`, tool-call arguments or a message that is JSON text. Token ids
(an embeddings `input`) and ordinary arrays of numbers are not read so."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.errors import GatewayError
from gateway_extproc.policy import Scanner, walk_strings
from gateway_extproc.policy.classification import Policy
from gateway_extproc.render import chart_values, render_values

ROOT = Path(__file__).resolve().parent.parent
CFG = config.parse(yaml.safe_load(render_values(chart_values([ROOT / "helm" / "values-local.yaml"]))["gateway.yaml"]),
                   "values-local (rendered)")
assert CFG.classification is not None
POLICY = Policy(CFG.classification)
KEY = CFG.keys["demo"]
SCANNER = Scanner.compile()
BASE: dict[str, Any] = {"model": "private-chat", "messages": [{"role": "user", "content": "hi"}]}

CARDS: dict[str, list[int]] = {
    "digits": [4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    "groups": [4111, 1111, 1111, 1111],
    "thousands": [4, 111, 111, 111, 111, 111],
    "amex": [3782, 822463, 10005],
}


def check(body: dict[str, Any], model: str = "private-chat") -> tuple[str | None, str]:
    """(the verdict's tier, the body that would leave, as JSON)."""
    verdict = POLICY.check_request(body, KEY, CFG.teams.get(KEY.team), None, CFG.models[model], "demo")
    return verdict.tier, orjson.dumps(verdict.body if verdict.body is not None else body).decode()


def places(value: Any) -> dict[str, dict[str, Any]]:
    """Where a caller puts an array: metadata, a tool schema's `enum`, an array of arrays, a tool
    call's arguments and a message that is JSON text."""
    text = orjson.dumps({"card": value}).decode()
    return {
        "metadata": {**BASE, "metadata": {"c": value}},
        "enum": {**BASE, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"c": {"type": "array", "enum": [value]}}}}}]},
        "arguments": {**BASE, "messages": [{"role": "user", "content": "charge it"}, {
            "role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "charge", "arguments": text}}]}]},
        "content-part": {**BASE, "messages": [{"role": "user", "content": [
            {"type": "text", "text": orjson.dumps(value).decode()}]}]},
        "spaced-content": {**BASE, "messages": [{"role": "user", "content": ", ".join(map(str, value)).join("[]")}]},
    }


@pytest.mark.parametrize("layout", sorted(CARDS))
@pytest.mark.parametrize("place", sorted(places([1])))
def test_a_card_sent_as_an_array_is_redacted_and_sets_the_tier(layout: str, place: str) -> None:
    value = CARDS[layout]
    body = places(value)[place]
    tier, sent = check(body)
    digits = "".join(map(str, value))
    assert tier == "restricted"
    assert "[CREDIT_CARD_1]" in sent and digits not in "".join(c for c in sent if c.isdigit())
    if place == "arguments":  # still JSON for the tool's parser: the numbers are now one placeholder
        args = orjson.loads(orjson.loads(sent)["messages"][1]["tool_calls"][0]["function"]["arguments"])
        assert args == {"card": ["[CREDIT_CARD_1]"]}
    if place == "metadata":
        assert orjson.loads(sent)["metadata"] == {"c": "[CREDIT_CARD_1]"}
    with pytest.raises(GatewayError) as refused:
        check(body, "default-chat")
    assert refused.value.code == "classification_violation"


def test_an_ssn_as_an_array_under_an_ssn_name_is_redacted() -> None:
    tier, sent = check({**BASE, "metadata": {"ssn": [123, 45, 6789]}})
    assert tier == "restricted" and orjson.loads(sent)["metadata"] == {"ssn": "[US_SSN_1]"}


@pytest.mark.parametrize("value", [
    [2024, 12, 5, 10, 30, 0], [255, 128, 0, 255, 128, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    [4111, 1111, 1111, 1112],  # (fails Luhn)
    [4111.0, 1111, 1111, 1111], [True, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [-4111, 1111, 1111, 1111]])
def test_ordinary_arrays_of_numbers_are_numbers(value: list[Any]) -> None:
    for place, body in places(value).items():
        if place in ("metadata", "enum"):
            assert check(body)[0] != "restricted", place


def test_token_ids_are_not_read_as_a_number_and_cost_one_check() -> None:
    """Embeddings token ids spell no card (they are read as the text they stand for); an 8k
    array costs one length check, not a join."""
    tokens = [4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    for body in ({"model": "x", "input": tokens}, {"model": "x", "input": [tokens, tokens]},
                 {"model": "x", "prompt": tokens}):
        keyed: dict[str, None] = {}
        walk_strings(body, keyed=keyed)
        assert keyed == {}
    big = {"model": "x", "input": [[i % 100_000 for i in range(8192)]] * 4}
    keyed = {}
    started = time.perf_counter()
    walk_strings(big, keyed=keyed)
    assert keyed == {} and time.perf_counter() - started < 0.05


def test_an_array_spelling_a_card_in_an_answer_is_found() -> None:
    """The same reading for what a provider sends back (`read_json`: a tool_use `input`)."""
    from gateway_extproc.policy.classification import read_json, rewritten
    answer = {"content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"card": [4111, 1111, 1111, 1111]}}]}
    read = read_json(SCANNER, answer)
    assert not isinstance(read, type(None)) and [f.rule for f in read.findings] == ["credit_card"]
    assert rewritten(answer, read, read.findings)["content"][0]["input"] == {"card": "[CREDIT_CARD_1]"}


@pytest.mark.parametrize("doc", ['{"card": [4111, 1111, 1111, 1111]}', '{"c": [4,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], "d": 1}',
                                 '{"c": [\n  4,\n  111,\n  111,\n  111,\n  111,\n  111\n]}'])
def test_an_array_in_streamed_tool_call_arguments_is_redacted_at_every_split(doc: str) -> None:
    """An answer's tool-call arguments arrive in pieces: an array still open at a piece's end
    is read with the next piece (as a number is), so a split anywhere hides nothing, and the
    redacted arguments stay JSON."""
    from gateway_extproc.policy import DecisionParams, StreamRedactor
    for i in range(len(doc)):
        for j in range(i, len(doc), 3):
            redactor = StreamRedactor(SCANNER, DecisionParams(), 64, json=True)
            out = "".join(redactor.feed(p) for p in (doc[:i], doc[i:j], doc[j:]) if p) + redactor.flush()
            assert "[CREDIT_CARD_1]" in out and "4111" not in "".join(c for c in out if c.isdigit()), (i, j, out)
            orjson.loads(out)
    redactor = StreamRedactor(SCANNER, DecisionParams(), 64, json=True)
    assert redactor.feed('{"sizes": [1, 2, 3], "at": [2024, 12, 5]}') + redactor.flush() == \
        '{"sizes": [1, 2, 3], "at": [2024, 12, 5]}'
