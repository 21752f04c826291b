"""Detection quality on the labelled corpus (tests/pii_corpus.py), through `Policy.check_request`
as the router calls it: every evasion is found and leaves nothing of the value in the body
that would be forwarded; benign text stays (almost) untouched. bench/detection_quality.py
prints the same figures per detector."""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.errors import GatewayError
from gateway_extproc.policy import Scanner, walk_strings
from gateway_extproc.policy.classification import Policy
from gateway_extproc.render import chart_values, render_values

from .pii_corpus import Case, benign, leaks, positives

POSITIVES = positives()
BENIGN = benign()
SCANNER = Scanner.compile()


def test_corpus_size_and_coverage() -> None:
    assert len(POSITIVES) >= 500 and len(BENIGN) >= 2000
    by = Counter(c.detector for c in POSITIVES)
    assert set(by) == {"credit_card", "us_ssn", "iban", "email", "phone"}


def body_for(case: Case, model: str) -> dict:
    """The strings of a case as a chat request: one message each, or content parts, tool
    results or tool-call arguments for the split cases (every shape a value may be split over)."""
    strings = case.strings
    if len(strings) == 1:
        return {"model": model, "messages": [{"role": "user", "content": strings[0]}]}
    shape = zlib.crc32((case.evasion + strings[0]).encode()) % 4
    if shape == 3:  # one tool call per string: the value split over their JSON arguments
        calls = [{"id": f"call_{i}", "type": "function",
                  "function": {"name": "lookup", "arguments": orjson.dumps({"text": s}).decode()}}
                 for i, s in enumerate(strings)]
        return {"model": model, "messages": [{"role": "user", "content": "look these up"},
                                             {"role": "assistant", "content": None, "tool_calls": calls}]}
    if shape == 0:
        messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": s} for i, s in enumerate(strings)]
    elif shape == 1:
        messages = [{"role": "user", "content": [{"type": "text", "text": s} for s in strings]}]
    else:
        messages = [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]}]
        messages += [{"role": "tool", "tool_call_id": "call_1", "content": s} for s in strings]
    return {"model": model, "messages": messages}


@pytest.fixture(scope="module")
def policy_check() -> Callable[[Case], list[str]]:
    """`Policy.check_request` as the router calls it, on the rendered helm/values-local.yaml,
    for the model approved up to `restricted`: the strings of the body that would leave."""
    root = Path(__file__).resolve().parent.parent
    values = chart_values([root / "helm" / "values-local.yaml"])
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    policy = Policy(cfg.classification)
    key = cfg.keys["demo"]

    def check(case: Case) -> list[str]:
        body = body_for(case, "private-chat")
        try:
            verdict = policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["private-chat"], "demo")
        except GatewayError:
            return []  # refused: nothing leaves
        sent = walk_strings(verdict.body if verdict.body is not None else body)
        assert isinstance(sent, list)
        return sent
    return check


def test_the_leak_check_sees_every_seeded_value() -> None:
    """Guards the guard: unredacted, every case leaks by `leaks` (so a pass above means something)."""
    blind = [(c.detector, c.evasion) for c in POSITIVES if not leaks("".join(c.strings), c.canonical)]
    assert blind == []


def _detected(case: Case) -> bool:
    return any(f.detector == case.detector for f in SCANNER.scan_strings(case.strings))


@pytest.mark.parametrize("case", POSITIVES, ids=lambda c: f"{c.detector}:{c.evasion}")
def test_every_evasion_is_detected_and_redacted_away(case: Case, policy_check) -> None:
    sent = policy_check(case)
    assert not leaks("".join(sent), case.canonical), f"{case.evasion}: {sent!r}"
    assert _detected(case)


def test_recall_and_false_positive_targets() -> None:
    missed = [c for c in POSITIVES if not _detected(c)]
    recall = 1 - len(missed) / len(POSITIVES)
    fp_lines = [line for line in BENIGN if any(f.rule in ("credit_card", "us_ssn", "iban", "email", "phone")
                                                for f in SCANNER.scan(line))]
    assert recall >= 0.99, [(c.detector, c.evasion) for c in missed]
    assert len(fp_lines) / len(BENIGN) <= 0.005, fp_lines


@pytest.mark.parametrize("place", ["metadata", "top-level", "tool-schema", "logit-bias"])
def test_a_card_as_a_json_key_is_redacted_and_sets_the_tier(place: str) -> None:
    """A JSON object key is caller text like any value: a card there is found, raises the tier
    (a model not approved for `restricted` refuses) and is redacted in the forwarded body."""
    root = Path(__file__).resolve().parent.parent
    cfg = config.parse(yaml.safe_load(render_values(chart_values([root / "helm" / "values-local.yaml"]))[
        "gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    policy, key = Policy(cfg.classification), cfg.keys["demo"]
    card = "4111 1111 1111 1111"
    base = {"model": "private-chat", "messages": [{"role": "user", "content": "hi"}]}
    body = {"metadata": {**base, "metadata": {card: "x"}}, "top-level": {**base, card: 1},
            "tool-schema": {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {f"card {card}": {"type": "string"}}}}}]},
            "logit-bias": {**base, "logit_bias": {card.replace(" ", ""): 5}}}[place]
    verdict = policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["private-chat"], "demo")
    assert verdict.tier == "restricted" and verdict.body is not None
    sent = orjson.dumps(verdict.body).decode()
    assert not leaks(sent, card) and "[CREDIT_CARD_1]" in sent
    with pytest.raises(GatewayError) as refused:
        policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["default-chat"], "demo")
    assert refused.value.code == "classification_violation"


@pytest.mark.parametrize("place", ["metadata", "top-level", "enum", "float", "in-a-list", "ssn-with-context"])
def test_a_value_sent_as_a_json_number_is_redacted_and_sets_the_tier(place: str) -> None:
    """JSON numbers were never scanned: a card as a number in metadata, in a tool schema's
    `enum` (which the model reads) or written as a float went out as sent."""
    root = Path(__file__).resolve().parent.parent
    cfg = config.parse(yaml.safe_load(render_values(chart_values([root / "helm" / "values-local.yaml"]))[
        "gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    policy, key = Policy(cfg.classification), cfg.keys["demo"]
    base = {"model": "private-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000000000,
            "seed": 1733333333}
    card = 4111111111111111
    body = {"metadata": {**base, "metadata": {"c": card}}, "top-level": {**base, "card": card},
            "enum": {**base, "tools": [{"type": "function", "function": {"name": "f", "parameters": {
                "type": "object", "properties": {"c": {"type": "integer", "enum": [card], "default": card}}}}}]},
            "float": {**base, "metadata": {"c": 4.111111111111111e15}},
            "in-a-list": {**base, "metadata": {"c": [1, card, 2]}},
            "ssn-with-context": {**base, "metadata": {"ssn": 123456789}}}[place]
    verdict = policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["private-chat"], "demo")
    assert verdict.body is not None
    sent = orjson.dumps(verdict.body).decode()
    assert verdict.tier == "restricted"
    if place == "ssn-with-context":  # the member's name is the context word: nine bare digits are an SSN
        assert verdict.body["metadata"] == {"ssn": "[US_SSN_1]"}
        order = {**base, "metadata": {"order": 219099999}}  # without one: an order number
        assert policy.check_request(order, key, cfg.teams.get(key.team), None, cfg.models["private-chat"],
                                    "demo").body is None
    else:
        assert "4111111111111111" not in sent and "[CREDIT_CARD_1]" in sent
    assert verdict.body["max_tokens"] == 1000000000 and verdict.body["seed"] == 1733333333  # other numbers kept
    seeded = {**body, "seed": 4111111111111111}  # the API's own random parameter: never a value
    assert policy.check_request(seeded, key, cfg.teams.get(key.team), None, cfg.models["private-chat"],
                                "demo").body["seed"] == 4111111111111111
    with pytest.raises(GatewayError) as refused:
        policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["default-chat"], "demo")
    assert refused.value.code == "classification_violation"


def test_a_custom_keyword_as_a_plain_identifier_key_is_found() -> None:
    """Plain identifier keys (`max_tokens`) are skipped only while no custom rule could match
    letters alone: with one, a key named after a keyword counts like the keyword anywhere."""
    root = Path(__file__).resolve().parent.parent
    values = chart_values([root / "helm" / "values-local.yaml"])
    values["classification"]["custom"] = [{"name": "project-falcon", "kind": "keywords", "keywords": ["falcon"],
                                           "action": "block", "minTier": "restricted"}]
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local + custom")
    assert cfg.classification is not None
    policy, key = Policy(cfg.classification), cfg.keys["demo"]
    body = {"model": "private-chat", "messages": [{"role": "user", "content": "hi"}], "metadata": {"falcon": "go"}}
    with pytest.raises(GatewayError) as blocked:
        policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["private-chat"], "demo")
    assert blocked.value.code == "content_blocked"


@pytest.mark.parametrize("escaped", [
    '{"card": "\\u0034111111111111111"}', '{"email": "jane.doe\\u0040example.com"}',
    '{"ssn": "123\\u002d45\\u002d6789"}', '{"n": "4111\\u00201111\\u00201111\\u00201111"}',
    '{"i": "\\u0044E89370400440532013000"}', '{"n": "4111\\n1111\\n1111\\n1111", "q": "say \\"hi\\" \\ud83d\\ude00"}',
    ' {"card": "411111\\u0031111111111"}\n',  # whitespace around the JSON: still JSON to a parser
])
def test_json_escapes_in_tool_call_arguments_hide_no_value(escaped: str) -> None:
    """Tool-call arguments are JSON in a string: their escapes were scanned as written, so a
    card written `\\u0034111…` (a `4` to every parser) went out."""
    root = Path(__file__).resolve().parent.parent
    cfg = config.parse(yaml.safe_load(render_values(chart_values([root / "helm" / "values-local.yaml"]))[
        "gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    policy, key = Policy(cfg.classification), cfg.keys["demo"]
    body = {"model": "private-chat", "messages": [
        {"role": "user", "content": "look it up"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": escaped}}]}]}
    verdict = policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["private-chat"], "demo")
    assert verdict.body is not None
    arguments = verdict.body["messages"][1]["tool_calls"][0]["function"]["arguments"]
    decoded = orjson.dumps(orjson.loads(arguments)).decode()  # still JSON; read as a parser reads it
    for value in ("4111111111111111", "4111 1111 1111 1111", "4111\n1111", "jane.doe@example.com", "123-45-6789",
                  "DE89370400440532013000"):
        assert value not in decoded


@pytest.mark.parametrize("metadata", [{"ssn": "123456789"}, {"user_ssn": "219099999"},
                                      {"social_security_number": "123 45 6789"}, {"socialSecurity": 123456789}])
def test_nine_digits_under_a_name_that_says_ssn_are_an_ssn(metadata: dict) -> None:
    """The name of a JSON member is the SSN's context word: scanned apart from the values,
    nine bare digits under `ssn` went out as sent."""
    root = Path(__file__).resolve().parent.parent
    cfg = config.parse(yaml.safe_load(render_values(chart_values([root / "helm" / "values-local.yaml"]))[
        "gateway.yaml"]), "values-local (rendered)")
    assert cfg.classification is not None
    policy, key = Policy(cfg.classification), cfg.keys["demo"]
    body = {"model": "private-chat", "messages": [{"role": "user", "content": "hi"}], "metadata": metadata,
            "user": "123456789"}
    verdict = policy.check_request(body, key, cfg.teams.get(key.team), None, cfg.models["private-chat"], "demo")
    assert verdict.tier == "restricted" and verdict.body is not None
    assert list(verdict.body["metadata"].values()) == ["[US_SSN_1]"]
    assert verdict.body["user"] == "123456789"  # nine digits under another name: an id
