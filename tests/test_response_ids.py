"""A chat answer's identifiers reach the client: a JSON answer's top-level `id`, and a stream
chunk's `id`, `model` and `system_fingerprint` (which every chunk repeats, and which the
Anthropic-client translation carries into `message_start`). Until 2026-12 output scanning
read none of them as text, so a card a provider put there went out whole. They are read now,
each apart from the answer's text (a value in an id is whole: nothing bridges it to the
content), once per distinct value (a stream's id is read on its first chunk; a `model` seen
clean is remembered per Policy, `known_labels`), and redacted per the rule; a blocking value
ends the answer as one in its text would. A tool call's `id` is still not read: it is the
provider's handle for the round trip, and a placeholder there would break it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from gateway_extproc import config
from gateway_extproc.policy import scanner
from gateway_extproc.policy.classification import Policy, ResponseGuard
from gateway_extproc.render import chart_values, render_values

ROOT = Path(__file__).resolve().parent.parent
CARD = "4111 1111 1111 1111"
DIGITS = CARD.replace(" ", "")
KEY = "sk-proj-" + "Ab3dE5gH7jK9mN1pQ3sT5vX7zA9cE1gI3kM5"  # openai_key: a block rule


@pytest.fixture(scope="module")
def cfg() -> Any:
    values = chart_values([ROOT / "helm" / "values-local.yaml"])
    parsed = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "values-local (rendered)")
    assert parsed.classification is not None
    return parsed.classification


@pytest.fixture
def policy(cfg: Any) -> Policy:
    return Policy(cfg)  # fresh: no labels remembered


@pytest.fixture
def scans() -> Any:
    """Every list of strings the scanner is asked to read, in order."""
    seen: list[list[str]] = []
    real = scanner.Scanner.scan_strings

    def spy(self: scanner.Scanner, strings, apart=False):  # type: ignore[no-untyped-def]
        seen.append(list(strings))
        return real(self, strings, apart)

    scanner.Scanner.scan_strings = spy  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        scanner.Scanner.scan_strings = real  # type: ignore[method-assign]


def guard(policy: Policy, in_order: bool = False) -> ResponseGuard:
    return ResponseGuard(policy, policy._params["enforce"], "demo", in_order)


def answer(id_: str = "chatcmpl-1", model: str = "gpt-x", content: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"id": id_, "object": "chat.completion", "model": model, "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content, **extra}, "finish_reason": "stop"}]}


# -- JSON answers ----------------------------------------------------------------------------


@pytest.mark.parametrize("id_", [f"chatcmpl-{DIGITS}", f"card {CARD}", f"chatcmpl-{CARD}"])
def test_a_card_in_a_json_answers_id_is_redacted(policy: Policy, id_: str) -> None:
    out = guard(policy).json_body(answer(id_=id_))
    assert out is not None, "the answer went out as the provider sent it"
    sent = orjson.loads(out)
    assert DIGITS not in sent["id"].replace(" ", "") and "[CREDIT_CARD_1]" in sent["id"], sent["id"]
    assert sent["choices"][0]["message"]["content"] == "ok"  # the rest as sent


def test_a_blocking_value_in_a_json_answers_id_blocks_the_answer(policy: Policy) -> None:
    out = guard(policy).json_body(answer(id_=f"chatcmpl-{KEY}"))
    assert out is not None
    sent = orjson.loads(out)
    assert KEY not in out.decode() and sent["choices"][0]["finish_reason"] == "content_filter", sent


def test_a_json_answers_id_is_read_apart_and_its_labels_once_per_value(policy: Policy, scans: Any) -> None:
    """The id is read on its own (a 28-digit run, as the bench's, is no card, and read joined
    with the content it would open regex windows reaching into it); `model` is read with the
    text until seen clean, then not again; a tool call's id is never read."""
    call = {"id": f"call_{DIGITS}", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    assert guard(policy).json_body(answer(id_="chatcmpl-BENCH0000000000000000000001", tool_calls=[call])) is None
    assert ["chatcmpl-BENCH0000000000000000000001"] in scans and any("gpt-x" in s for s in scans)
    assert not any(f"call_{DIGITS}" in s for s in scans)
    scans.clear()
    assert guard(policy).json_body(answer(id_="chatcmpl-2")) is None
    assert scans == [["ok"], ["chatcmpl-2"]]  # model, role and finish_reason remembered


def test_a_json_answer_without_an_id_or_with_an_odd_one_is_read_as_before(policy: Policy) -> None:
    body = answer()
    del body["id"]
    assert guard(policy).json_body(body) is None
    out = guard(policy).json_body(answer(id_={"x": f"card {CARD}"}))  # type: ignore[arg-type]
    assert out is not None and "4111 1111" not in out.decode()  # (an object under `id` was walked before)


# -- streams ---------------------------------------------------------------------------------


def chunk(content: str | None = "", finish: str | None = None, id_: str = "chatcmpl-s", model: str = "gpt-x",
          **head: Any) -> bytes:
    delta = {} if content is None else {"content": content}
    return b"data: " + orjson.dumps({"id": id_, "object": "chat.completion.chunk", "model": model, **head,
                                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + b"\n\n"


def usage_chunk(id_: str, model: str) -> bytes:
    return b"data: " + orjson.dumps({"id": id_, "object": "chat.completion.chunk", "model": model, "choices": [],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}) + b"\n\n"


def stream(g: ResponseGuard, events: list[bytes]) -> list[dict[str, Any]]:
    out = b"".join(g.sse_event(e) for e in [*events, b"data: [DONE]\n\n"]) + g.flush()
    return [orjson.loads(line[6:]) for line in out.split(b"\n\n") if line.startswith(b"data: {")]


@pytest.mark.parametrize("field", ["id", "model", "system_fingerprint"])
@pytest.mark.parametrize("in_order", [False, True])
def test_a_card_in_a_stream_chunks_head_never_reaches_the_client(policy: Policy, field: str, in_order: bool) -> None:
    value = f"x-{CARD}"
    head = {"id": "chatcmpl-s", "model": "gpt-x", "system_fingerprint": "fp_1", field: value}
    events = [chunk("Hello ", **head), chunk("there, this is a longer answer than the hold-back window of "
                                             "sixty-four characters, so text goes out mid-stream.", **head),
              chunk(None, "stop", **head), usage_chunk(head["id"], head["model"])]
    got = stream(guard(policy, in_order), events)
    sent = orjson.dumps(got).decode()
    assert "4111 1111" not in sent and DIGITS not in sent
    assert len(got) >= 3 and all(c[field] == "x-[CREDIT_CARD_1]" for c in got if field in c), got
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c.get("choices"))
    assert text.startswith("Hello there") and text.endswith("mid-stream.")


def test_a_blocking_value_in_a_stream_chunks_model_ends_the_stream_without_it(policy: Policy) -> None:
    g = guard(policy)
    out = b"".join(g.sse_event(e) for e in [chunk("Hello", model=f"m {KEY}"), chunk(" more")])
    assert KEY not in out.decode()
    events = [orjson.loads(x[6:]) for x in out.split(b"\n\n") if x.startswith(b"data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter" and out.endswith(b"data: [DONE]\n\n")


def test_a_streams_head_is_read_once_and_a_clean_model_not_again(policy: Policy, scans: Any) -> None:
    events = [chunk("Hi"), chunk(" there"), chunk(None, "stop"), usage_chunk("chatcmpl-s", "gpt-x")]
    stream(guard(policy), events)
    heads = [s for s in scans if "chatcmpl-s" in s]
    assert heads == [["chatcmpl-s", "gpt-x"]], scans  # on the first chunk only
    scans.clear()
    stream(guard(policy), [chunk("Hi", id_="chatcmpl-t"), chunk(None, "stop", id_="chatcmpl-t")])
    assert [s for s in scans if "chatcmpl-t" in s] == [["chatcmpl-t"]]  # the model was seen clean


def test_a_head_that_changes_mid_stream_is_read_again(policy: Policy) -> None:
    long = " there, this is a longer answer than the hold-back window of sixty-four characters, so it goes out."
    got = stream(guard(policy), [chunk("Hi"), chunk(long, id_=f"chatcmpl-{DIGITS}"), chunk(None, "stop")])
    assert DIGITS not in orjson.dumps(got).decode()
    assert "chatcmpl-[CREDIT_CARD_1]" in [c["id"] for c in got], got


def test_the_anthropic_client_translation_carries_the_redacted_head(policy: Policy) -> None:
    from gateway_extproc import messages

    g = guard(policy, in_order=True)
    to_client = messages.ToMessagesStream()
    events = [chunk("Hello", id_=f"msg-{DIGITS}", model=f"claude {CARD}"), chunk(None, "stop", id_=f"msg-{DIGITS}",
                                                                                   model=f"claude {CARD}")]
    out = b"".join(to_client.feed(g.sse_event(e), False) for e in [*events, b"data: [DONE]\n\n"])
    out += to_client.feed(g.flush(), True)
    assert b"message_start" in out and DIGITS.encode() not in out and b"4111 1111" not in out, out


@pytest.mark.parametrize("field, value", [("id", int(DIGITS)), ("model", {"name": CARD}), ("model", [DIGITS]),
                                          ("system_fingerprint", float(DIGITS))])
def test_a_card_in_a_stream_chunks_head_of_another_type_never_reaches_the_client(policy: Policy, field: str,
                                                                                  value: Any) -> None:
    """A head label that is no string (an id written as a number, a model as an object) was
    skipped as "no label the SDK accepts"; the openai SDK builds its chunks without validating
    them, so the card reached the client in every chunk (until 2026-12-05). Such a value is
    read like a field outside the schema: one holding a finding is dropped."""
    events = [chunk("Hello", **{field: value}), chunk(None, "stop", **{field: value}),
              b"data: " + orjson.dumps({"id": "chatcmpl-s", "model": "gpt-x", "choices": [], field: value,
                                        "usage": {"prompt_tokens": 1, "completion_tokens": 2,
                                                  "total_tokens": 3}}) + b"\n\n"]
    got = stream(guard(policy), events)
    sent = orjson.dumps(got).decode()
    assert DIGITS not in sent.replace(" ", "") and "4.111" not in sent, sent
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c.get("choices")) == "Hello"


def test_a_clean_head_label_of_another_type_goes_out_as_sent(policy: Policy) -> None:
    got = stream(guard(policy), [chunk("Hello", id_=7), chunk(None, "stop", id_=7)])  # type: ignore[arg-type]
    assert [c["id"] for c in got] == [7, 7], got
