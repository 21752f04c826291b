"""Unit tests for gateway_extproc.tokens: tokenizer specs and prompt-count formulas."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import bpe_openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from gateway_extproc import tokens

from .pdf_files import build as build_pdf

# -- counter(): bundled OpenAI encodings --------------------------------------------------

# Known values, independent of the library under test.
KNOWN = [
    ("o200k_base", "hello world", 2),
    ("cl100k_base", "hello world", 2),
    ("o200k_base", "The quick brown fox jumps over the lazy dog.", 10),
    ("cl100k_base", "The quick brown fox jumps over the lazy dog.", 10),
    ("o200k_base", "", 0),
    ("cl100k_base", "", 0),
]


@pytest.mark.parametrize(("spec", "text", "expected"), KNOWN)
def test_known_counts(spec: str, text: str, expected: int) -> None:
    assert tokens.counter(spec)(text) == expected


@pytest.mark.parametrize("spec", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("text", [
    "Hello, how are you?",
    "h\u00e9llo w\u00f6rld \U0001f916",
    "def f(x):\n    return x ** 2\n",
    "<|endoftext|> is treated as text, not a special token",
    "\u4f60\u597d\uff0c\u4e16\u754c",
    " " * 17,
])
def test_counts_match_bpe_openai(spec: str, text: str) -> None:
    enc = bpe_openai.get_encoding(spec)
    assert tokens.counter(spec)(text) == len(enc.encode_ordinary(text))


def test_encodings_differ_where_expected() -> None:
    """o200k and cl100k really are different encodings (not one cached counter)."""
    text = "h\u00e9llo w\u00f6rld \U0001f916"
    assert tokens.counter("o200k_base")(text) != tokens.counter("cl100k_base")(text)


def test_counter_is_cached() -> None:
    assert tokens.counter("o200k_base") is tokens.counter("o200k_base")
    assert tokens.counter("estimate") is tokens.counter("estimate")


@pytest.mark.parametrize("spec", ["o200k_base", "cl100k_base"])
def test_a_text_of_a_million_characters_is_counted(spec: str) -> None:
    """bpe-openai refuses 1,000,000 characters or more; a request or reply may hold them
    (envoy.maxRequestBytes is 10 MiB). Counted in pieces, the sum is the exact count."""
    sentence, n = "The nightly export failed at 03:14, retried twice (exit 137).", 20_000
    text = " ".join([sentence] * n)
    enc = bpe_openai.get_encoding(spec)
    with pytest.raises(ValueError):
        enc.encode_ordinary(text)
    assert tokens.counter(spec)(text) == len(enc.encode_ordinary(sentence)) + (n - 1) * len(
        enc.encode_ordinary(" " + sentence))


@pytest.mark.parametrize("spec", ["o200k_base", "cl100k_base"])
@pytest.mark.parametrize("unit", ["\u00e9", "a1", ".,", "\U0001f600", "\u4e02"])
def test_text_dense_in_tokens_is_counted(spec: str, unit: str) -> None:
    """bpe-openai also refuses one call that makes over 200,000 tokens: 250,000 "é" (one
    token each, no space to cut at) was a 500 gateway_internal_error at any endpoint."""
    text = unit * (600_000 // len(unit))
    enc = bpe_openai.get_encoding(spec)
    with pytest.raises(ValueError):
        enc.encode_ordinary(text)
    assert tokens.counter(spec)(text) >= 200_000


_PIECE_TEXT = st.text(alphabet="ab Z9.,;(\n\t'-é你", max_size=300)


@settings(max_examples=300, deadline=None)
@given(text=_PIECE_TEXT, size=st.integers(min_value=4, max_value=64))
def test_pieces_cover_the_text_and_keep_the_count(text: str, size: int) -> None:
    """Every cut is just before a space that starts a word, or hard where none is near: the
    pieces are the text, none is longer than `size`, and cuts before a word's space change no
    BPE count (a cut inside a run of spaces did: '999999   ' counted 4 tokens, not 3)."""
    parts = tokens.pieces(text, size)
    assert "".join(parts) == text
    assert all(len(p) <= size for p in parts)
    assert all(p for p in parts) or text == ""
    if all(p.startswith(" ") and len(p) > 1 and not p[1].isspace() for p in parts[1:]):
        for spec in ("o200k_base", "cl100k_base"):
            enc = bpe_openai.get_encoding(spec)
            assert sum(len(enc.encode_ordinary(p)) for p in parts) == len(enc.encode_ordinary(text))


def test_unknown_encoding_fails_at_load() -> None:
    with pytest.raises(Exception, match="not supported"):
        tokens.counter("o300k_base")


# -- counter(): estimate ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("", 0),
    ("a", 1),
    ("abcd", 1),
    ("abcde", 2),
    ("abcdefgh", 2),
    ("\u00e9", 1),  # 2 UTF-8 bytes
    ("\u00e9\u00e9\u00e9", 2),  # 6 bytes
    ("\U0001f916", 1),  # 4 bytes
    ("\U0001f916a", 2),  # 5 bytes
    ("x" * 1001, 251),
])
def test_estimate_is_ceil_utf8_bytes_over_4(text: str, expected: int) -> None:
    assert tokens.counter("estimate")(text) == expected


# -- counter(): tokenizer.json ------------------------------------------------------------


@pytest.fixture(scope="module")
def word_level_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, ",": 3, "user": 4}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.mark.parametrize(("text", "expected"), [
    ("hello world", 2),
    ("hello, world!", 4),  # hello , world ! (unknown words still count as one token)
    ("hello    world  hello", 3),
    ("completely unknown words here", 4),
    ("", 0),
])
def test_tokenizer_json_counts(word_level_json: str, text: str, expected: int) -> None:
    assert tokens.counter(word_level_json)(text) == expected


def test_tokenizer_json_in_chat_formula(word_level_json: str) -> None:
    body = {"messages": [{"role": "user", "content": "hello, world"}]}
    # 3 priming + 3 framing + "user" (1) + "hello , world" (3)
    assert tokens.chat_prompt_tokens(body, tokens.counter(word_level_json)) == 10


def test_tokenizer_json_missing_file(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="No such file"):
        tokens.counter(str(tmp_path / "missing" / "tokenizer.json"))


# -- chat_prompt_tokens -------------------------------------------------------------------

# A transparent counter so the formula is visible: one token per character.
by_chars = len


@pytest.mark.parametrize(("body", "expected"), [
    # 3 to prime the reply + per message (3 + role + content)
    ({"messages": [{"role": "user", "content": "hello"}]}, 3 + 3 + 4 + 5),
    ({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]},
     3 + (3 + 6 + 8) + (3 + 4 + 2)),
    # name adds its tokens + 1
    ({"messages": [{"role": "user", "name": "bob", "content": "hi"}]}, 3 + 3 + 4 + (3 + 1) + 2),
    ({"messages": [{"role": "user", "name": 7, "content": "hi"}]}, 3 + 3 + 4 + 2),  # non-string name: 0
    # list content: text parts by text, image parts 85 each, others (audio, files) as their JSON
    ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "abc"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
        {"type": "input_image", "image_url": "data:..."},
        {"type": "image", "source": {}},
        {"type": "input_audio", "input_audio": {"data": "..."}},
        "not a part",
    ]}]}, 3 + 3 + 4 + 3 + 3 * tokens.IMAGE_TOKENS + len('{"type":"input_audio","input_audio":{"data":"..."}}')),
    ({"messages": [{"role": "user", "content": [{"type": "input_text", "text": "abcd"}]}]}, 3 + 3 + 4 + 4),
    ({"messages": [{"role": "user", "content": []}]}, 3 + 3 + 4),
    # no / null content (e.g. an assistant tool call)
    ({"messages": [{"role": "assistant", "content": None}]}, 3 + 3 + 9),
    ({"messages": [{"role": "assistant"}]}, 3 + 3 + 9),
    # a non-string role is not counted; every other key is (a refusal, a legacy function_call)
    ({"messages": [{"role": 5, "content": "x", "refusal": "nope"}]}, 3 + 3 + 1 + 4),
])
def test_chat_prompt_tokens_formula(body: dict[str, Any], expected: int) -> None:
    assert tokens.chat_prompt_tokens(body, by_chars) == expected


def test_chat_prompt_tokens_counts_tool_calls_and_tools() -> None:
    tool_calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"messages": [{"role": "assistant", "content": None, "tool_calls": tool_calls}], "tools": tools}
    expected = 3 + 3 + 9 + len(orjson.dumps(tool_calls)) + len(orjson.dumps(tools))
    assert tokens.chat_prompt_tokens(body, by_chars) == expected
    assert tokens.chat_prompt_tokens({**body, "tools": []}, by_chars) == expected - len(orjson.dumps(tools))


def test_chat_prompt_tokens_with_o200k() -> None:
    body = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                         {"role": "user", "content": "hello world"}]}
    enc = bpe_openai.get_encoding("o200k_base")
    n = lambda s: len(enc.encode_ordinary(s))  # noqa: E731
    expected = 3 + (3 + n("system") + n("You are a helpful assistant.")) + (3 + n("user") + n("hello world"))
    assert tokens.chat_prompt_tokens(body, tokens.counter("o200k_base")) == expected
    # hello world alone: 3 + 3 + "user"(1) + 2 = 9
    assert tokens.chat_prompt_tokens({"messages": [{"role": "user", "content": "hello world"}]},
                                     tokens.counter("o200k_base")) == 9


# -- embedding_input_tokens ---------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [
    ("hello", 5),
    ("", 0),
    (["hello", "abc"], 8),
    ([1, 2, 3, 4], 4),  # one token array: each int is one token
    ([[1, 2, 3], [4, 5], []], 5),  # several token arrays
    (["ab", [1, 2], 7], 5),  # mixed (validated elsewhere; counted sensibly)
])
def test_embedding_input_tokens(value: Any, expected: int) -> None:
    assert tokens.embedding_input_tokens({"input": value}, by_chars) == expected


def test_embedding_input_tokens_with_cl100k() -> None:
    count = tokens.counter("cl100k_base")
    assert tokens.embedding_input_tokens({"input": "hello world"}, count) == 2
    assert tokens.embedding_input_tokens({"input": ["hello world", "hello world"]}, count) == 4


def test_remembered_counts_equal_fresh_counts_and_long_texts_are_not_kept() -> None:
    """The per-tokenizer memo (repeated system prompts, tool schemas) never changes a count,
    and texts above its size bound are counted every time, not kept."""
    enc = bpe_openai.get_encoding("o200k_base")
    count = tokens.counter("o200k_base")
    texts = ["Say hello.", "héllo wörld " * 50, "x" * (tokens._MEMO_MAX_CHARS + 1), ""]
    for _ in range(2):
        assert [count(t) for t in texts] == [len(enc.encode_ordinary(t)) for t in texts]


@pytest.mark.parametrize(("text", "size"), [("999999   x", 8), ("ab   cd    ef  gh" * 4, 24),
                                           ("x \n  y\t  z   q" * 5, 30)])
def test_runs_of_spaces_are_not_cut_inside(text: str, size: int) -> None:
    """A cut before the first space of a run split BPE's whitespace token: one more token."""
    enc = bpe_openai.get_encoding("o200k_base")
    parts = tokens.pieces(text, size)
    assert sum(len(enc.encode_ordinary(p)) for p in parts) == len(enc.encode_ordinary(text)), parts


# -- decoder() and embedding_text(): token IDs read as text ---------------------------------


def test_bpe_decoder_reads_token_ids_as_their_text() -> None:
    decode = tokens.decoder("cl100k_base")
    import bpe_openai

    enc = bpe_openai.get_encoding("cl100k_base")
    text = "SSN 123-45-6789, café 世界"
    assert decode(enc.encode_ordinary(text)) == text
    assert decode(enc.encode_ordinary("世")[:1]).endswith("\ufffd")  # a character cut in half
    with pytest.raises(ValueError, match="not in this model's vocabulary"):
        decode([1, enc.n_vocab + 10])


def test_tokenizer_json_decoder(word_level_json: str) -> None:
    decode = tokens.decoder(word_level_json)
    assert decode([1, 2]) == "hello world"
    with pytest.raises(ValueError, match="vocabulary of 5"):
        decode([1, 99])


def test_estimate_has_no_decoder() -> None:
    assert tokens.decoder("estimate") is None


@pytest.mark.parametrize(("value", "expected"), [
    ("text", None), (["a", "b"], None), ([104, 105], "hi"), ([[104], [105, 105]], ["h", "ii"])])
def test_embedding_text(value: object, expected: object) -> None:
    decode = lambda ids: "".join(chr(i) for i in ids)  # noqa: E731 - a stand-in vocabulary
    out = tokens.embedding_text({"model": "m", "input": value}, decode)
    assert out == (None if expected is None else {"model": "m", "input": expected})


def test_embedding_text_without_a_vocabulary_refuses_token_ids() -> None:
    assert tokens.embedding_text({"input": "x"}, None) is None
    with pytest.raises(ValueError, match="cannot read token IDs"):
        tokens.embedding_text({"input": [1, 2]}, None)


def test_an_unknown_token_id_is_not_quoted_back() -> None:
    """A token ID is caller text: a card number sent as one (4111111111111111) must not come
    back in the error that refuses it."""
    decode = tokens.decoder("cl100k_base")
    with pytest.raises(ValueError, match="not in this model's vocabulary") as err:
        decode([1, 4111111111111111])
    assert "4111111111111111" not in str(err.value)



@pytest.mark.parametrize(("body", "extra"), [
    ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "functions"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}}, "response_format"),
    ({"messages": [{"role": "assistant", "function_call": {"name": "f", "arguments": "{\"a\": 1}"}}]},
     "function_call"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "JVBERi0xLjQK"}}]}]}, "file"),
])
def test_every_field_a_provider_bills_as_input_is_counted(body: dict[str, Any], extra: str) -> None:
    """Fields left out of the count were prompt the budget never saw (89,000 tokens in a
    schema, admitted on a $0.001 key)."""
    base = {"messages": [{"role": "user", "content": "hi"}]}
    with_extra = {**base, **body, "messages": base["messages"] + body.get("messages", [])}
    assert tokens.chat_prompt_tokens(with_extra, by_chars) > tokens.chat_prompt_tokens(
        {**base, "messages": base["messages"] + [{"role": m["role"]} for m in body.get("messages", [])]}, by_chars) + 5


def test_responses_tools_format_and_function_outputs_are_counted() -> None:
    plain = {"input": [{"role": "user", "content": "hi"}]}
    rich = {"input": [{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "c1",
                                                          "output": "x" * 100}],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}}}
    assert tokens.responses_input_tokens(rich, by_chars) >= tokens.responses_input_tokens(plain, by_chars) + 100 + 40


def test_a_predicted_outputs_tokens_are_counted() -> None:
    count = tokens.counter("o200k_base")
    text = "word " * 10
    assert tokens.prediction_tokens({"prediction": {"type": "content", "content": text}}, count) == count(text)
    parts = {"prediction": {"type": "content", "content": [{"type": "text", "text": text}]}}
    assert tokens.prediction_tokens(parts, count) == count(text) > 0
    assert tokens.prediction_tokens({"prediction": "junk"}, count) == tokens.prediction_tokens({}, count) == 0


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "system", "developer"]), st.text(max_size=20)),
                min_size=1, max_size=30),
       st.none() | st.text(max_size=20))
def test_responses_input_counts_at_least_the_same_conversation_as_chat(turns: list[tuple[str, str]],
                                                                       instructions: str | None) -> None:
    """OpenAI runs a Responses request through the same message format as chat, framing and
    all (about 3 tokens a message besides its role and text, 3 to prime the reply), and bills
    it. Responses input was counted without any: 40,000 one-token items were reserved as
    80,000 tokens and billed about 200,000, the excess above the reservation never charged to
    a budget. The same conversation now counts at least what chat counts."""
    count = tokens.counter("o200k_base")
    items = [{"role": role, "content": text} for role, text in turns]
    chat = [{"role": "system", "content": instructions}] if instructions is not None else []
    body: dict[str, Any] = {"input": items} if instructions is None else {"input": items, "instructions": instructions}
    assert tokens.responses_input_tokens(body, count) >= tokens.chat_prompt_tokens({"messages": chat + items}, count)
    if len(items) == 1 and instructions is None and turns[0][0] == "user":
        assert tokens.responses_input_tokens({"input": turns[0][1]}, count) >= tokens.chat_prompt_tokens(
            {"messages": items}, count)


# -- inline PDFs: billed as extracted text plus an image of every page ---------------------

PER_PAGE = 1600 + tokens.PDF_PAGE_TEXT_TOKENS
FAIL_CLOSED = tokens.PDF_MAX_PAGES * PER_PAGE


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pdf_parts(data: str) -> dict[str, dict[str, Any]]:
    """The shapes an inline PDF arrives in, by where it is counted."""
    uri = f"data:application/pdf;base64,{data}"
    return {
        "chat file": {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "summarize"},
            {"type": "file", "file": {"filename": "a.pdf", "file_data": uri}}]}]},
        "chat file, bare base64": {"messages": [{"role": "user", "content": [
            {"type": "file", "file": {"filename": "report", "file_data": data}}]}]},
        "chat image_url (Gemini reads it as a PDF)": {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": uri}}]}]},
        "responses input_file": {"input": [{"role": "user", "content": [
            {"type": "input_file", "filename": "a.pdf", "file_data": uri}]}]},
        "responses function output": {"input": [{"type": "function_call_output", "call_id": "c1", "output": [
            {"type": "input_file", "filename": "a.pdf", "file_data": uri}]}]},
    }


def _prompt(body: dict[str, Any]) -> int:
    count = tokens.counter("o200k_base")
    if "messages" in body:
        return tokens.chat_prompt_tokens(body, count, 1600)
    return tokens.responses_input_tokens(body, count, 1600)


@pytest.mark.parametrize("shape", list(_pdf_parts("")))
def test_an_inline_pdf_counts_every_page(shape: str) -> None:
    """500 empty pages are 7 KB (a few thousand tokens of base64) and bill 500 page images
    and their text: the count was the base64's, and the bill escaped the budget."""
    body = _pdf_parts(_b64(build_pdf(500, object_stream=True)))[shape]
    assert _prompt(body) >= 500 * PER_PAGE


@pytest.mark.parametrize("shape", list(_pdf_parts("")))
def test_a_one_page_pdf_counts_one_page_or_its_length(shape: str) -> None:
    data = _b64(build_pdf(1, size=7000))
    body = _pdf_parts(data)[shape]
    as_json = 0 if "image_url" in shape else tokens.counter("o200k_base")(data)  # (an image counts no JSON)
    assert max(PER_PAGE, as_json) <= _prompt(body) < 2 * PER_PAGE + len(data)


@pytest.mark.parametrize("data", [
    pytest.param(_b64(b"%PDF-1.7\n" + bytes(range(256)) * 20), id="no page tree"),
    pytest.param(_b64(build_pdf(3).replace(b"/Root", b"/Encrypt 9 0 R /Root")), id="encrypted"),
    pytest.param("!!not base64!!", id="not base64"),
])
def test_a_pdf_whose_pages_cannot_be_told_counts_the_most_pages_providers_accept(data: str) -> None:
    """Fail closed: under a small budget it is refused (budget_exceeded); without budgets
    a count changes nothing."""
    for shape, body in _pdf_parts(data).items():
        if shape != "chat file, bare base64" or data.startswith("JVBER"):  # (bare: a PDF only by its bytes)
            assert _prompt(body) >= FAIL_CLOSED, shape


def test_a_pdf_by_url_to_an_image_part_counts_the_most_pages() -> None:
    """Gemini backends send an image_url ending in .pdf as a PDF (fileData): pages unknown."""
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "gs://bucket/Scan.PDF?x=1"}}]}]}
    assert _prompt(body) >= FAIL_CLOSED


@pytest.mark.parametrize("part", [
    {"type": "file", "file": {"filename": "a.txt", "file_data": "data:text/plain;base64," + _b64(b"hello " * 50)}},
    {"type": "image_url", "image_url": {"url": "http://[abc/cat.png"}},  # (no URL: a parser raised)
    {"type": "image_url", "image_url": {"url": "data:image/png;base64," + _b64(b"\x89PNG" + bytes(60))}},
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
])
def test_other_files_and_images_count_as_before(part: dict[str, Any]) -> None:
    body = {"messages": [{"role": "user", "content": [part]}]}
    count = tokens.counter("o200k_base")
    alone = 1600 if part["type"] == "image_url" else count(orjson.dumps(part).decode())
    assert _prompt(body) == tokens.chat_prompt_tokens({"messages": [{"role": "user", "content": []}]}, count) + alone
