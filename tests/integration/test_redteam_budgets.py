"""Red-team findings on the budget promise (spend never exceeds a budget), through real Envoy,
each a request shape or a provider behaviour that once let a bill run past what budgets charged."""

from __future__ import annotations

import openai
import pytest

from .conftest import Gateway


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


@pytest.mark.parametrize(("api", "payload", "param"), [
    # An item reference: the provider pulls a stored item (a whole earlier message) into the input.
    ("responses", [{"type": "item_reference", "id": "msg_0123456789"}, {"role": "user", "content": "and then?"}],
     "input[0]"),
    ("responses", [{"role": "user", "content": "go on"}, {"id": "msg_0123456789"}], "input[1]"),
    # A stored or remote file: the provider reads a PDF's text and an image of every page, billed as input.
    ("responses", [{"role": "user", "content": [{"type": "input_file", "file_id": "file-0123456789"},
                                                 {"type": "input_text", "text": "summarize"}]}],
     "input[0].content[0].file_id"),
    ("responses", [{"role": "user", "content": [{"type": "input_file", "file_url": "https://example.com/a.pdf"}]}],
     "input[0].content[0].file_url"),
    ("responses", [{"type": "function_call_output", "call_id": "c1", "output": [
        {"type": "input_file", "file_id": "file-0123456789"}]}], "input[0].output[0].file_id"),
    ("chat", [{"role": "user", "content": [{"type": "text", "text": "summarize"},
                                           {"type": "file", "file": {"file_id": "file-0123456789"}}]}],
     "messages[0].content[1].file.file_id"),
])
def test_stored_items_and_files_are_refused_under_a_budget(gw: Gateway, api: str, payload: list, param: str) -> None:
    """Like `previous_response_id`, an item reference or a file named by id or URL is input the
    provider adds itself: the gateway counted a few tokens of JSON, reserved that, and the
    provider billed the whole stored item or document (admitted with 200 before the fix).
    Nothing leaves; a file sent inline is counted and passes."""
    before = len(gw.received(gw.primary))
    with pytest.raises(openai.BadRequestError) as info:
        if api == "chat":
            client(gw).chat.completions.create(model="default-chat", messages=payload)
        else:
            client(gw).responses.create(model="default-chat", input=payload)
    body = info.value.body
    assert info.value.status_code == 400 and body["code"] == "context_not_countable" and body["param"] == param
    assert set(body) == {"message", "type", "code", "param"}
    assert len(gw.received(gw.primary)) == before
    inline = [{"role": "user", "content": [{"type": "input_file", "filename": "a.txt",
                                            "file_data": "data:text/plain;base64,aGVsbG8="},
                                           {"type": "input_text", "text": "summarize"}]}]
    assert client(gw).responses.create(model="default-chat", input=inline).status == "completed"
