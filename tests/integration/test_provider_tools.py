"""Tool calling, JSON mode and broken provider streams through real Envoy, for every
provider kind: the OpenAI SDK's tool loop and the anthropic SDK's tool use against
OpenAI, Azure, Anthropic, Bedrock and Gemini backends (the mock provider calls the first
offered tool with arguments fitting its schema), a Gemini 3 conversation whose thought
signatures must survive the OpenAI pivot, and providers that send garbage mid-stream."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from .conftest import Gateway, add_provider_models, running_gateway

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "description": "City name"},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}
ARGS = {"city": "mock", "unit": "celsius"}
TOOLS: Any = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                                "parameters": WEATHER, "strict": True}},
              {"type": "function", "function": {"name": "get_time"}}]
QUESTION: Any = [{"role": "user", "content": "weather in Paris?"}]
# Every provider kind; bedrock-chat and gemini3-chat are added to the local values here.
MODELS = ["default-chat", "azure-chat", "claude-chat", "bedrock-chat", "gemini-chat", "gemini3-chat"]
TRANSLATED = ["claude-chat", "bedrock-chat", "gemini-chat"]


@pytest.fixture(scope="module")
def tools_gateway() -> Iterator[Gateway]:
    with running_gateway("gw-tools-", customize=add_provider_models) as gw:
        yield gw


@pytest.fixture
def gw(tools_gateway: Gateway) -> Gateway:
    tools_gateway.reset()
    return tools_gateway


def oai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)


def claude(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_openai_sdk_tool_loop(gw: Gateway, model: str, stream: bool) -> None:
    client = oai(gw)
    if stream:
        with client.chat.completions.stream(model=model, messages=QUESTION, tools=TOOLS) as events:
            first = events.get_final_completion()
    else:
        first = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS)
    choice = first.choices[0]
    [call] = choice.message.tool_calls or []
    assert choice.finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and orjson.loads(call.function.arguments) == ARGS
    history: Any = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=model, messages=history, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop" and second.choices[0].message.tool_calls is None
    assert "weather in Paris?" in (second.choices[0].message.content or "")
    forced = client.chat.completions.create(model=model, messages=QUESTION, tools=TOOLS,
                                            tool_choice={"type": "function", "function": {"name": "get_time"}})
    assert (forced.choices[0].message.tool_calls or [])[0].function.arguments == "{}"


@pytest.mark.parametrize("model", MODELS)
def test_anthropic_sdk_tool_use(gw: Gateway, model: str) -> None:
    tools: Any = [{"name": "get_weather", "description": "Weather now", "input_schema": WEATHER}]
    client = claude(gw)
    msg = client.messages.create(model=model, max_tokens=200, tools=tools, messages=QUESTION)
    assert msg.stop_reason == "tool_use"
    [use] = [block for block in msg.content if block.type == "tool_use"]
    assert use.name == "get_weather" and use.input == ARGS
    with client.messages.stream(model=model, max_tokens=200, tools=tools, messages=QUESTION) as events:
        final = events.get_final_message()
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == [("get_weather", ARGS)]
    answered = client.messages.create(model=model, max_tokens=200, tools=tools, messages=[
        *QUESTION, {"role": "assistant", "content": [use.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "21 degrees"}]}])
    assert answered.stop_reason == "end_turn" and answered.content[0].type == "text"


def test_gemini_receives_a_schema_it_accepts(gw: Gateway) -> None:
    oai(gw).chat.completions.create(model="gemini-chat", messages=QUESTION, tools=TOOLS)
    [sent] = gw.received(gw.backup)
    assert sent["body"]["tools"] == [{"functionDeclarations": [
        {"name": "get_weather", "description": "Weather now", "parameters": {
            "type": "object", "required": ["city", "unit"],
            "properties": {"city": {"type": "string", "description": "City name"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}},
        {"name": "get_time"}]}]


def test_bedrock_receives_no_empty_description(gw: Gateway) -> None:
    oai(gw).chat.completions.create(model="bedrock-chat", messages=QUESTION, tools=[
        {"type": "function", "function": {"name": "get_time", "description": ""}}])
    [sent] = gw.received(gw.backup)
    assert sent["body"]["toolConfig"]["tools"] == [{"toolSpec": {"name": "get_time", "inputSchema": {
        "json": {"type": "object", "properties": {}}}}}]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_gemini_3_thought_signatures_survive_the_openai_pivot(gw: Gateway, stream: bool) -> None:
    """The mock refuses, as Gemini 3 does, a next turn whose function call lacks the
    thoughtSignature it was sent with."""
    client = oai(gw)
    if stream:
        with client.chat.completions.stream(model="gemini3-chat", messages=QUESTION, tools=TOOLS) as events:
            first = events.get_final_completion()
    else:
        first = client.chat.completions.create(model="gemini3-chat", messages=QUESTION, tools=TOOLS)
    [call] = first.choices[0].message.tool_calls or []
    assert "__thought__" in call.id
    history: Any = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                    {"role": "tool", "tool_call_id": call.id, "content": "21"}]
    second = client.chat.completions.create(model="gemini3-chat", messages=history, tools=TOOLS)
    assert second.choices[0].finish_reason == "stop"
    stripped = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [{**call.model_dump(), "id": "c1"}]},
                {"role": "tool", "tool_call_id": "c1", "content": "21"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="gemini3-chat", messages=stripped, tools=TOOLS)
    assert "thought_signature" in info.value.body["message"]


@pytest.mark.parametrize("model", ["default-chat", "azure-chat", "gemini-chat"])
def test_json_mode(gw: Gateway, model: str) -> None:
    client = oai(gw)
    plain = client.chat.completions.create(model=model, messages=QUESTION, response_format={"type": "json_object"})
    assert isinstance(orjson.loads(plain.choices[0].message.content or ""), dict)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    fitted = client.chat.completions.create(model=model, messages=QUESTION, response_format={
        "type": "json_schema", "json_schema": {"name": "a", "strict": True, "schema": schema}})
    assert orjson.loads(fitted.choices[0].message.content or "") == {"answer": "mock", "sure": True}


# -- providers that break their stream ------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
@pytest.mark.parametrize("model", TRANSLATED)
def test_garbage_mid_stream_ends_with_one_provider_error(gw: Gateway, model: str, kind: str) -> None:
    """The garbage comes after two events and the provider then carries on to a clean
    end: the client gets what came before, one provider_error event, and nothing after.
    Junk bytes outside any `data:` field of an SSE stream are what the SSE standard says
    to ignore, so there (Anthropic, Gemini) the answer goes on intact; in Bedrock's
    binary framing they break the stream."""
    headers = {"x-mock-garbage-after-chunks": "2", "x-mock-garbage": kind}
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", timeout=30, headers={
            "authorization": f"Bearer {gw.key}", **headers},
            json={"model": model, "messages": QUESTION, "stream": True}) as response:
        assert response.status_code == 200
        body = response.read()
    events = body.split(b"\n\n")
    assert events[-1] == b"" and all(e.startswith(b"data: ") for e in events[:-1])
    if kind == "bytes" and model != "bedrock-chat":
        assert events[-2] == b"data: [DONE]" and b'"error"' not in body
        return
    last = orjson.loads(events[-2][6:])
    assert last["error"]["code"] == "provider_error" and last["error"]["type"] == "server_error"
    assert b"[DONE]" not in body and body.count(b'"error"') == 1
    with pytest.raises(openai.APIError) as info:
        list(oai(gw).chat.completions.create(model=model, messages=QUESTION, stream=True, extra_headers=headers))
    assert info.value.code == "provider_error"


def test_garbage_mid_stream_reaches_anthropic_clients_as_an_error_event(gw: Gateway) -> None:
    with pytest.raises(anthropic.APIStatusError):
        with claude(gw).messages.stream(model="gemini-chat", max_tokens=50, messages=QUESTION,
                                        extra_headers={"x-mock-garbage-after-chunks": "2"}) as events:
            for _ in events:
                pass


# -- LangChain, as its users point it at the gateway ------------------------------------------


@pytest.mark.parametrize("model", MODELS)
def test_langchain_bind_tools(gw: Gateway, model: str) -> None:
    @tool
    def get_weather(city: str, unit: str) -> str:
        """Weather now in a city, in celsius or fahrenheit."""
        return "21"

    chat = ChatOpenAI(model=model, base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)  # type: ignore[arg-type]
    question = HumanMessage("weather in Paris?")
    answer = chat.bind_tools([get_weather]).invoke([question])
    [call] = answer.tool_calls
    assert call["name"] == "get_weather" and set(call["args"]) == {"city", "unit"}
    result = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    final = chat.bind_tools([get_weather]).invoke([question, answer, result])  # Gemini 3: signature sent back
    assert final.tool_calls == [] and "weather in Paris?" in str(final.content)
    streamed = None
    for piece in chat.bind_tools([get_weather]).stream("weather in Paris?"):
        streamed = piece if streamed is None else streamed + piece
    assert streamed is not None and [c["name"] for c in streamed.tool_calls] == ["get_weather"]


@pytest.mark.parametrize("model", ["default-chat", "azure-chat", "gemini-chat"])
def test_langchain_json_mode(gw: Gateway, model: str) -> None:
    chat = ChatOpenAI(model=model, base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)  # type: ignore[arg-type]
    schema = {"title": "Answer", "type": "object", "properties": {"answer": {"type": "string"}},
              "required": ["answer"]}
    assert isinstance(chat.with_structured_output(schema, method="json_mode").invoke("reply in JSON"), dict)
    assert chat.with_structured_output(schema, method="json_schema").invoke("weather?") == {"answer": "mock"}


@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
@pytest.mark.parametrize("model", TRANSLATED)
def test_unreadable_json_answer_is_a_provider_error(gw: Gateway, model: str, kind: str) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        oai(gw).chat.completions.create(model=model, messages=QUESTION, extra_headers={
            "x-mock-garbage-after-chunks": "0", "x-mock-garbage": kind})
    assert info.value.status_code == 502 and info.value.body["code"] == "provider_error"


@pytest.mark.parametrize("kind", ["json", "shape", "bytes"])
@pytest.mark.parametrize("model", MODELS)
def test_unreadable_answers_reach_anthropic_clients_as_provider_errors(gw: Gateway, model: str, kind: str) -> None:
    """An Anthropic-style client on every backend kind, the OpenAI ones included (whose
    answer the router itself turns into an Anthropic message): an answer that is no
    completion is a 502 provider_error, never a gateway_internal_error. A stream with a bad
    event either ends in an error event (translated providers) or, where the router
    translates an OpenAI stream, goes on without the event it could not read."""
    with pytest.raises(anthropic.APIStatusError) as info:
        claude(gw).messages.create(model=model, max_tokens=50, messages=QUESTION, extra_headers={
            "x-mock-garbage-after-chunks": "0", "x-mock-garbage": kind})
    assert info.value.status_code == 502 and info.value.body["error"]["code"] == "provider_error"
    with claude(gw).messages.stream(model=model, max_tokens=50, messages=QUESTION, extra_headers={
            "x-mock-garbage-after-chunks": "2", "x-mock-garbage": kind}) as events:
        try:
            text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
        except anthropic.APIStatusError:
            assert model not in ("default-chat", "azure-chat")  # the error event of a translated provider
            return
    assert text and (model in ("default-chat", "azure-chat") or kind == "bytes" and model != "bedrock-chat")


async def test_burst_of_tool_streams_with_broken_ones_mixed_in(gw: Gateway) -> None:
    """120 concurrent streamed tool calls over every translated kind, every third one with
    garbage mid-stream: each clean one yields exactly its tool call and [DONE], each broken
    one exactly one provider_error event; none leaks into another."""

    async def one(client: httpx.AsyncClient, n: int) -> None:
        model = TRANSLATED[n % len(TRANSLATED)]
        broken = n % 3 == 0
        headers = {"authorization": f"Bearer {gw.key}"}
        if broken:
            headers.update({"x-mock-garbage-after-chunks": "2", "x-mock-garbage": ("json", "shape")[n % 2]})
        response = await client.post("/v1/chat/completions", headers=headers, json={
            "model": model, "messages": [{"role": "user", "content": f"weather #{n}?"}], "tools": TOOLS,
            "stream": True})
        assert response.status_code == 200
        events = [orjson.loads(e[6:]) if e != b"data: [DONE]" else "[DONE]"
                  for e in response.content.split(b"\n\n")[:-1]]
        if broken:
            assert [e for e in events if e != "[DONE]" and "error" in e] == [events[-1]]
            assert events[-1]["error"]["code"] == "provider_error" and "[DONE]" not in events
            return
        assert events[-1] == "[DONE]"
        calls = [c for e in events[:-1] for ch in e["choices"] for c in ch["delta"].get("tool_calls") or []]
        arguments = "".join(c["function"].get("arguments") or "" for c in calls)
        assert [c["function"]["name"] for c in calls if c.get("id")] == ["get_weather"]
        assert orjson.loads(arguments) == ARGS

    async with httpx.AsyncClient(base_url=gw.url, timeout=60,
                                 limits=httpx.Limits(max_connections=120)) as client:
        await asyncio.gather(*(one(client, n) for n in range(120)))


@pytest.mark.parametrize("model", [*TRANSLATED, "default-chat"])
def test_a_field_of_the_wrong_type_for_a_translated_backend_is_a_400(gw: Gateway, model: str) -> None:
    """`tools: 5` once reached the translator, which could not read it (the attempt was a
    500, then a 400 naming no field); the router now refuses it for every backend alike."""
    with pytest.raises(openai.BadRequestError) as info:
        oai(gw).chat.completions.create(model=model, messages=QUESTION, tools=5)  # type: ignore[arg-type]
    assert info.value.status_code == 400 and info.value.body["code"] == "invalid_request"
    assert info.value.body["param"] == "tools"
    assert gw.received(gw.primary) == gw.received(gw.backup) == []  # refused before any provider


CUT = {"x-mock-reply": "alpha beta gamma delta epsilon zeta", "x-mock-end-after-chunks": "4"}


@pytest.mark.parametrize("model", ["default-chat", "claude-chat"])
@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_stream_cut_short_delivers_the_text_output_scanning_held_back(gw: Gateway, model: str, sdk: str) -> None:
    """The provider stops after a few words, without a finish_reason: the words output
    scanning held back (at most 64 characters, here all of them) reach the client before
    the stream's error event (they were lost: the client saw an error and no text)."""
    text = []
    if sdk == "openai":
        with pytest.raises(openai.APIError):
            for chunk in oai(gw).chat.completions.create(model=model, messages=QUESTION, stream=True,
                                                         extra_headers=CUT):
                text += [c.delta.content or "" for c in chunk.choices]
    else:
        with pytest.raises(anthropic.APIStatusError):
            with claude(gw).messages.stream(model=model, max_tokens=50, messages=QUESTION,
                                            extra_headers=CUT) as events:
                for event in events:
                    if event.type == "content_block_delta" and event.delta.type == "text_delta":
                        text.append(event.delta.text)
    got = "".join(text)
    assert got.strip() and "alpha beta gamma delta epsilon zeta".startswith(got.strip()), got


def test_n_null_is_served(gw: Gateway) -> None:
    """`"n": null` means the default; the router's check of n against its maximum raised
    on it (a 500 gateway_internal_error)."""
    response = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"},
                          json={"model": "default-chat", "n": None, "messages": QUESTION}, timeout=30)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
