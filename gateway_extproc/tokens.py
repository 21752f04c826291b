"""Prompt token counts, computed locally before a request leaves.

`tokenizer` in a model's config is one of:
- an OpenAI encoding bundled with bpe-openai (`o200k_base`, `cl100k_base`, ...): exact;
- a path to a Hugging Face `tokenizer.json` (loaded with `tokenizers`, never downloaded);
- `estimate`: ceil(UTF-8 bytes / 4), OpenAI's rule of thumb, for models we cannot tokenize.
Chat messages add OpenAI's per-message framing (3 tokens each, 3 to prime the reply);
each image part counts as the model's `imageTokens` (IMAGE_TOKENS unless configured: the
most a provider bills for one image, since the gateway does not decode images), and a PDF
sent inline as many pages as it may have (pdf.py), each an image plus its text. Counts for
non-OpenAI tokenizers and images are estimates; provider-reported usage is what accounting
finally uses, and the count only has to make the reservation cover the bill.
"""

from __future__ import annotations

import binascii
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import orjson

from . import pdf

TokenCount = Callable[[str], int]
# One image at its most expensive: OpenAI gpt-4o high detail is at most 85 + 8 tiles x 170 =
# 1,445, Claude about 1,600 (1.15 megapixels / 750). Counting the low-detail 85 let an
# image-heavy prompt's bill run far past its reservation (docs/budgets.md).
IMAGE_TOKENS = 1600
# Text a PDF page bills beside its image: Anthropic documents 1,500-3,000 tokens of text per
# page ("PDF support", estimating costs); the high end. Providers bill an inline PDF as its
# extracted text plus an image of every page, so each page reserves `imageTokens` + this.
PDF_PAGE_TEXT_TOKENS = 3000
# The most pages any provider reads from a PDF: Gemini's 1,000 ("Document understanding");
# Anthropic and OpenAI accept 100. A PDF whose page count cannot be told (encrypted, an
# object stream under another filter, no page tree) reserves this many, so under a small
# budget it is refused (budget_exceeded); a count above it is lowered to it.
PDF_MAX_PAGES = 1000
# Counts of recent strings, per tokenizer: system prompts and tool schemas repeat verbatim
# across an application's calls, and a lookup (a hash of the string) costs ~1/50 of a BPE
# pass. Bounded: at most _MEMO_ENTRIES strings of at most _MEMO_MAX_CHARS characters each.
_MEMO_ENTRIES, _MEMO_MAX_CHARS = 1024, 8192
# bpe-openai refuses a text of 1,000,000 characters or more ("Input too long to encode
# safely") and a call that makes more than 200,000 tokens (its chunk limit for cl100k_base,
# o200k_base, voyage3_base); a request may carry such a text (up to envoy.maxRequestBytes)
# and so may a reply. Texts are counted in pieces of at most this many characters: a
# byte-level BPE makes at most one token per UTF-8 byte, so at most 4 per character.
BPE_PIECE_CHARS = 200_000 // 4


@lru_cache(maxsize=None)
def counter(spec: str) -> TokenCount:
    """A text -> token count function for a tokenizer spec (cached; loaded once per process)."""
    if spec == "estimate":
        return lambda text: -(-len(text.encode("utf-8")) // 4)
    if spec.endswith(".json"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(spec)
        return _memo(lambda text: len(tok.encode(text, add_special_tokens=False).ids))
    import bpe_openai

    enc = bpe_openai.get_encoding(spec)
    return _memo(lambda text: sum(len(enc.encode_ordinary(piece)) for piece in pieces(text, BPE_PIECE_CHARS)))


TokenDecode = Callable[[list[int]], str]


@lru_cache(maxsize=None)
def decoder(spec: str) -> TokenDecode | None:
    """Token IDs -> the text they stand for, in this tokenizer (None for `estimate`, which
    has no vocabulary). Raises ValueError for an ID the vocabulary lacks. Bytes that are not
    whole UTF-8 characters (a token array may end inside one) come out as U+FFFD."""
    if spec == "estimate":
        return None
    if spec.endswith(".json"):
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(spec)
        size = tok.get_vocab_size(with_added_tokens=True)

        def decode_json(ids: list[int]) -> str:
            if any(i >= size for i in ids):
                raise ValueError(f"a token ID is not in this model's vocabulary of {size}")
            return tok.decode(ids, skip_special_tokens=False)
        return decode_json
    import bpe_openai

    enc = bpe_openai.get_encoding(spec)

    def decode_bpe(ids: list[int]) -> str:
        try:
            return enc.decode(ids, errors="replace")
        except KeyError:
            raise ValueError(f"a token ID is not in this model's vocabulary of {enc.n_vocab}") from None
    return decode_bpe


def embedding_text(body: dict[str, Any], decode: TokenDecode | None) -> dict[str, Any] | None:
    """The embeddings body with its token IDs decoded to text, for classification: what the
    classifier must read is what the provider will embed. None when `input` holds no token
    IDs. Raises ValueError when it does and `decode` is None or an ID is unknown."""
    value = body["input"]
    if isinstance(value, str) or not value or isinstance(value[0], str):
        return None
    if decode is None:
        raise ValueError("this model's tokenizer is `estimate`, which cannot read token IDs")
    text = decode(value) if isinstance(value[0], int) else [decode(ids) for ids in value]
    return {**body, "input": text}


def pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at most `size` characters, each cut just before a space
    that starts a word (not inside a run of whitespace) where the last half of a piece has
    one. BPE's pre-tokenizers start a word at the space before it, so such cuts split no
    token and the counts add up exactly; a text with no such space for `size // 2`
    characters is cut anyway (a token or so more per cut)."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        cut = text.rfind(" ", start + size // 2, start + size)
        while cut >= 0 and text[cut + 1].isspace():  # inside a run of whitespace BPE keeps whole
            cut = text.rfind(" ", start + size // 2, cut)
        if cut <= start:
            cut = start + size
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _memo(count: TokenCount) -> TokenCount:
    recent = lru_cache(maxsize=_MEMO_ENTRIES)(count)  # thread-safe: large bodies count off the loop
    return lambda text: recent(text) if len(text) <= _MEMO_MAX_CHARS else count(text)


# Request fields besides the messages that providers bill as input (a schema, tool
# definitions): counted as their JSON. Everything else a message or an input item carries
# (tool calls, a legacy `function_call`, a `refusal`, a function call's `output`) is counted
# too, as its text or JSON: a field left out was prompt the budget never saw (89,000 tokens
# in a `response_format` schema, admitted on a $0.001 key).
_CHAT_EXTRA = ("tools", "functions", "response_format")
_RESPONSES_EXTRA = ("tools", "text")
_NOT_TEXT = frozenset({"id", "type", "status", "tool_call_id", "call_id"})


def _value_tokens(value: Any, count: TokenCount) -> int:
    if isinstance(value, str):
        return count(value)
    return count(orjson.dumps(value).decode()) if value else 0


def chat_prompt_tokens(body: dict[str, Any], count: TokenCount, image: int = IMAGE_TOKENS) -> int:
    """`image`: what one image part counts (the model's `imageTokens`)."""
    total = 3
    for message in body["messages"]:
        total += 3
        for key, value in message.items():
            if key == "content":
                total += _content_tokens(value, count, image)
            elif key == "name":
                total += count(value) + 1 if isinstance(value, str) else 0
            elif key == "role":
                total += count(value) if isinstance(value, str) else 0
            elif key not in _NOT_TEXT:
                total += _value_tokens(value, count)
    for key in _CHAT_EXTRA:
        total += _value_tokens(body.get(key), count)
    return total


def prediction_tokens(body: dict[str, Any], count: TokenCount) -> int:
    """A chat request's Predicted Output (`prediction: {type: content, content}`): its tokens
    that the answer does not use are billed as completion tokens, beyond the output cap."""
    prediction = body.get("prediction")
    if not isinstance(prediction, dict):
        return 0
    return _content_tokens(prediction.get("content"), count, IMAGE_TOKENS)


def responses_input_tokens(body: dict[str, Any], count: TokenCount, image: int = IMAGE_TOKENS) -> int:
    """Responses API: `instructions` plus `input` (a string, or items with chat-like content,
    function calls and their outputs), tools and the output format's schema. The provider
    renders the items as chat messages and bills their framing: counted as chat counts it
    (3 to prime the reply, 3 per item and for `instructions`; a string input is a user message)."""
    total = 3
    if isinstance(body.get("instructions"), str):
        total += 3 + count("system") + count(body["instructions"])
    for key in _RESPONSES_EXTRA:
        total += _value_tokens(body.get(key), count)
    value = body["input"]
    if isinstance(value, str):
        return total + 3 + count("user") + count(value)
    for item in value:
        total += 3
        if isinstance(item, dict):
            for key, field in item.items():
                if key == "content" or (key == "output" and isinstance(field, list)):  # (an output's files)
                    total += _content_tokens(field, count, image)
                elif key not in _NOT_TEXT:
                    total += _value_tokens(field, count)
    return total


def embedding_input_tokens(body: dict[str, Any], count: TokenCount, image: int = IMAGE_TOKENS) -> int:
    value = body["input"]
    if isinstance(value, str):
        return count(value)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += count(item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total


def _content_tokens(content: Any, count: TokenCount, image: int) -> int:
    if isinstance(content, str):
        return count(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            kind = part.get("type")
            if isinstance(part.get("text"), str):
                total += count(part["text"])
            elif kind in ("image_url", "input_image", "image"):
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                total += max(image, _pdf_pages(url, None, sniff=False) * (image + PDF_PAGE_TEXT_TOKENS))
            else:  # a refusal, a file, audio...: its JSON, or a PDF's pages if more
                file = part.get("file") if kind == "file" else part if kind == "input_file" else None
                pages = _pdf_pages(file.get("file_data"), file.get("filename"), sniff=True) if isinstance(
                    file, dict) else 0
                total += max(count(orjson.dumps(part).decode()), pages * (image + PDF_PAGE_TEXT_TOKENS))
    return total


def _pdf_pages(value: Any, filename: Any, *, sniff: bool) -> int:
    """The pages to reserve for a file or image sent as `value` (a data URL, or bare base64
    for a file): 0 unless it is a PDF. An image is one by its media type (Gemini backends
    send a `data:application/pdf` image, or a URL ending in .pdf, as a PDF); a file also by
    its name or its bytes (`sniff`). A PDF whose pages cannot be told counts PDF_MAX_PAGES."""
    if not isinstance(value, str):
        return 0
    declared = isinstance(filename, str) and filename.lower().endswith(".pdf")
    if value.startswith("data:"):
        header, _, value = value.partition(",")
        declared = declared or header[5:].split(";")[0].strip().lower() == "application/pdf"
        if ";base64" not in header.lower():
            return PDF_MAX_PAGES if declared else 0
    elif not sniff:  # an image by URL (its path's end, read without a URL parser, which may raise)
        return PDF_MAX_PAGES if value.partition("?")[0].partition("#")[0].lower().endswith(".pdf") else 0
    if not (declared or sniff):
        return 0
    try:  # lenient, as providers are: missing padding, line breaks, the URL-safe alphabet
        data = binascii.a2b_base64(value.translate(_URL_SAFE) + "==", strict_mode=False)
    except (binascii.Error, ValueError):
        return PDF_MAX_PAGES if declared else 0
    if not declared and b"%PDF" not in data[:pdf.HEADER_WINDOW]:
        return 0
    pages = pdf.pages(data)
    return PDF_MAX_PAGES if pages is None else min(pages, PDF_MAX_PAGES)


_URL_SAFE = str.maketrans("-_", "+/")
