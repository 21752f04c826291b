"""Redacted tool-call arguments stay JSON: a value a rule redacts is replaced, in streamed
arguments (`StreamRedactor(json=True)`, split at every offset) and in a JSON answer's
(`redact` on a string holding JSON), by a placeholder that the tool's parser still reads.
Until 2026-12-05 a card sent as a JSON number, `{"a": 4111111111111111}`, became
`{"a": [CREDIT_CARD_1]}`: the anthropic SDK's `messages.stream()` raised "Unable to parse tool
parameter JSON" and an openai tool loop's `json.loads` failed."""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_extproc.policy import DecisionParams, Rule, Scanner, StreamRedactor, redact

DETECTORS = ("email", "phone", "credit_card", "us_ssn", "iban")
PII = Scanner.compile([Rule(d, d, "redact", "confidential") for d in DETECTORS])
BLOCK = Scanner.compile([Rule(d, d, "block", "confidential") for d in DETECTORS])
PLACEHOLDER = re.compile(r"\[[A-Z_]+_\d+\]")

# (value, its key, the text that must not reach the client): a card, an SSN, a phone number,
# as a JSON number where a detector reads one (a phone number as a number is none) or a string.
VALUES: list[tuple[Any, str, str]] = [
    (4111111111111111, "card", "4111111111111111"),
    (-4111111111111111, "card", "4111111111111111"),
    (4111111111111111.0, "card", "4111111111111111"),
    ("4111111111111111", "card", "4111111111111111"),
    ("4111 1111 1111 1111", "card", "4111 1111 1111 1111"),
    (123456789, "ssn", "123456789"),
    ("123-45-6789", "ssn", "123-45-6789"),
    ("+1 415 555 0100", "phone", "415 555 0100"),
]

_word = st.text(alphabet="abcdefghij xyz", min_size=0, max_size=8)
_leaf = st.one_of(_word, st.integers(-999, 999), st.booleans(), st.none(), st.floats(-9, 9, allow_nan=False))
_filler = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                      st.dictionaries(_word, inner, max_size=3)), max_leaves=6)


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, str]:
    """A JSON object with one value at a random depth (in objects and arrays, among other
    values), written compact or spaced: (the text, the value's text)."""
    value, key, text = draw(st.sampled_from(VALUES))
    node: Any = value
    for _ in range(draw(st.integers(1, 5))):
        siblings = draw(st.dictionaries(_word.filter(lambda k: k not in (key, "ssn")), _filler, max_size=2))
        if node is not value and draw(st.booleans()):  # (the value itself under its key)
            items = [*siblings.values()]
            node = [*items[:1], node, *items[1:]]
        else:
            node = {**siblings, (key if node is value else draw(_word)): node}
    separators = draw(st.sampled_from([(", ", ": "), (",", ":")]))
    return json.dumps(node, separators=separators), text


def streamed(scanner: Scanner, deltas: list[str], params: DecisionParams | None = None) -> tuple[str, StreamRedactor]:
    r = StreamRedactor(scanner, params, 64, json=True)
    out = "".join(r.feed(d) for d in deltas) + r.flush()
    return out, r


def splits(text: str) -> list[list[str]]:
    """The text in two deltas at every offset, and one character per delta."""
    return [[text[:i], text[i:]] for i in range(len(text) + 1)] + [list(text)]


def assert_redacted_json(out: str, value: str) -> None:
    parsed = json.loads(out)  # (raises: what the client's parser would)
    assert value not in out and value.replace(" ", "") not in out, out
    assert PLACEHOLDER.search(json.dumps(parsed)), out  # (a string of the arguments holds it)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents())
def test_streamed_arguments_redacted_stay_json_at_every_split(doc: tuple[str, str]) -> None:
    text, value = doc
    for deltas in splits(text):
        out, r = streamed(PII, deltas)
        assert not r.blocked
        assert_redacted_json(out, value)


@settings(max_examples=60, deadline=None)
@given(documents())
def test_arguments_of_a_json_answer_redacted_stay_json(doc: tuple[str, str]) -> None:
    text, value = doc
    decision = PII.decide(PII.scan(text))
    out, _ = redact(text, decision.redact)
    assert_redacted_json(out, value)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.integers(0, 400))
def test_a_block_rule_on_a_value_in_arguments_still_blocks(doc: tuple[str, str], cut: int) -> None:
    text, value = doc
    out, r = streamed(BLOCK, [text[:cut], text[cut:]])
    assert r.blocked and r.block_decision is not None and r.block_decision.block
    assert value not in out and value.replace(" ", "") not in out


def test_a_number_is_replaced_by_a_string_and_a_string_keeps_its_quotes() -> None:
    for text, want in [
        ('{"a": 4111111111111111}', '{"a": "[CREDIT_CARD_1]"}'),
        ('{"a": [1, -4111111111111111, 2]}', '{"a": [1, "[CREDIT_CARD_1]", 2]}'),
        ('{"a": 4.111111111111111e15, "b": "x"}', '{"a": "[CREDIT_CARD_1]", "b": "x"}'),
        ('{"a": "card 4111111111111111 thanks"}', '{"a": "card [CREDIT_CARD_1] thanks"}'),
        ('{"ssn": 123456789}', '{"ssn": "[US_SSN_1]"}'),
    ]:
        assert redact(text, PII.decide(PII.scan(text)).redact)[0] == want
        for deltas in splits(text):
            assert streamed(PII, deltas)[0] == want, deltas


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(VALUES), st.integers(40, 200), st.integers(0, 10_000), st.integers(1, 97))
def test_compact_arguments_longer_than_the_word_hold_stay_json(value: tuple[Any, str, str], pad: int, cut: int,
                                                               step: int) -> None:
    """Compact JSON has no space: the whole arguments are one word, and one longer than the
    word hold (1,024 characters) goes out in checked steps whose finding replaced the rest of
    the word (until 2026-12-05 `{"pad[CREDIT_CARD_1]`, the rest of the arguments gone). A
    string's quotes end a word in JSON, as spaces do in text."""
    v, key, text = value
    doc = json.dumps({"pad": ["abcdefghij"] * pad, key: v, "z": ["klmnopqrst"] * pad}, separators=(",", ":"))
    cut %= len(doc)
    deltas = [doc[:cut]] + [doc[i:i + step] for i in range(cut, len(doc), step)]
    out, r = streamed(PII, deltas)
    assert_redacted_json(out, text)
    assert json.loads(out)["z"] == ["klmnopqrst"] * pad


def test_a_value_in_a_string_longer_than_the_word_hold_ends_at_its_quote() -> None:
    """A finding in a word longer than the word hold replaces the rest of the word: in JSON
    the rest of its string, whose closing quote stays."""
    doc = json.dumps({"blob": "x" * 1500 + "/4111111111111111/" + "y" * 1500, "z": 1}, separators=(",", ":"))
    for step in (1, 7, 100, len(doc)):
        out, _ = streamed(PII, [doc[i:i + step] for i in range(0, len(doc), step)])
        parsed = json.loads(out)
        assert parsed["z"] == 1 and DIGITS not in out and "[CREDIT_CARD_" in parsed["blob"], step


DIGITS = "4111111111111111"
