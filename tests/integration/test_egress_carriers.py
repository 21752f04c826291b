"""Text that travels as something other than a string, through real Envoy: embeddings sent as
token IDs (read as the text they stand for, decoded with the model's tokenizer) and files sent
as base64 data URIs of a textual media type (read as the text they carry). Before, both went
out unread: a card or an SSN encoded with o200k_base, or in a text/plain attachment, left
whole. Every positive of the PII corpus, as one token array per string and as a text file."""

from __future__ import annotations

import base64
import re
import zlib
from collections.abc import Iterator
from typing import Any

import bpe_openai
import httpx
import orjson
import pytest

from ..pdf_files import build
from ..pii_corpus import Case, padded_encodings, positives
from .conftest import Gateway, running_gateway
from .test_pii_egress import leaked

PDF = base64.b64encode(build(1)).decode()  # a real one-page PDF (a stub of one counts 1,000 pages: docs/budgets.md)

ENC = bpe_openai.get_encoding("o200k_base")
CASES = positives()


def _models(values: dict[str, Any]) -> None:
    base = next(m for m in values["models"] if m["name"] == "default-embedding")

    def model(name: str, tokenizer: str) -> dict[str, Any]:
        return {**base, "name": name, "tokenizer": tokenizer,
                "backends": [{**b, "maxTier": "restricted"} for b in base["backends"]]}
    values["models"] += [model("private-embedding", "o200k_base"), model("estimate-embedding", "estimate")]


@pytest.fixture(scope="module")
def gw() -> Iterator[Gateway]:
    with running_gateway("gw-emb-", customize=_models) as gateway:
        yield gateway


def embed(gw: Gateway, value: Any, model: str = "private-embedding") -> httpx.Response:
    return httpx.post(f"{gw.url}/v1/embeddings", json={"model": model, "input": value},
                      headers={"authorization": f"Bearer {gw.key}"}, timeout=30)


def as_tokens(case: Case) -> list[int] | list[list[int]]:
    """One string: a flat array (or, for some cases, an array of one array); several: an
    array of arrays, one per string, so a value split over strings is split over arrays."""
    if len(case.strings) == 1 and zlib.crc32(case.strings[0].encode()) % 2:
        return ENC.encode_ordinary(case.strings[0])
    return [ENC.encode_ordinary(s) for s in case.strings]


def received_texts(gw: Gateway) -> list[str]:
    """What the providers received, token IDs decoded as the provider would read them."""
    out = []
    for mock in (gw.primary, gw.backup):
        for r in gw.received(mock):
            value = r["body"]["input"]
            if isinstance(value, list) and value and isinstance(value[0], int):
                value = [value]
            decoded = [ENC.decode(v) if isinstance(v, list) else v for v in (value if isinstance(value, list)
                                                                              else [value])]
            out.append("\n".join(decoded) + "\n" + base64.b64decode(r["raw_body_base64"]).decode("utf-8", "replace"))
    return out


def test_no_corpus_value_reaches_the_provider_as_token_ids(gw: Gateway) -> None:
    gw.reset()
    statuses = {}
    with httpx.Client(timeout=30) as client:
        for case in CASES:
            r = client.post(f"{gw.url}/v1/embeddings", json={"model": "private-embedding", "input": as_tokens(case)},
                            headers={"authorization": f"Bearer {gw.key}"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (200, 403), r.text
    assert leaked(received_texts(gw), CASES) == []
    assert statuses.get(200), statuses  # redacted and served, not only refused


def test_clean_token_ids_go_out_unchanged_and_redacted_ones_as_text(gw: Gateway) -> None:
    gw.reset()
    clean = ENC.encode_ordinary("The quarterly report is ready for review.")
    assert embed(gw, clean).status_code == 200
    assert embed(gw, [clean, clean[:3]]).status_code == 200
    mail = ENC.encode_ordinary("write to jane.doe@example.com today")
    assert embed(gw, [clean, mail]).status_code == 200
    bodies = [r["body"]["input"] for r in gw.received(gw.primary) + gw.received(gw.backup)]
    assert bodies[:2] == [clean, [clean, clean[:3]]]
    assert bodies[2][0] == ENC.decode(clean) and "jane.doe@example.com" not in bodies[2][1]
    assert "write to" in bodies[2][1]


def test_a_restricted_value_as_token_ids_is_held_to_the_models_tier(gw: Gateway) -> None:
    """default-embedding (cl100k_base, as its provider reads token IDs) is approved up to
    `internal`: a card is `restricted` in any form."""
    gw.reset()
    cl100k = bpe_openai.get_encoding("cl100k_base")
    card = cl100k.encode_ordinary("pay with 4111 1111 1111 1111 please")
    split = [cl100k.encode_ordinary("pay with 4111 1111"), cl100k.encode_ordinary(" 1111 1111")]
    for value in (card, [card], split):
        r = embed(gw, value, "default-embedding")
        assert r.status_code == 403 and r.json()["error"]["code"] == "classification_violation", r.text
    assert gw.received(gw.primary) + gw.received(gw.backup) == []


@pytest.mark.parametrize("value", [[ENC.n_vocab + 5], [[1, 2], [ENC.n_vocab]], [-1], [[3, -2]], [1, "a"], [[1], []]],
                         ids=["unknown-id", "unknown-id-nested", "negative", "negative-nested", "mixed", "empty-array"])
def test_token_ids_the_tokenizer_cannot_read_are_refused(gw: Gateway, value: Any) -> None:
    gw.reset()
    r = embed(gw, value)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request" and r.json()["error"]["param"] == "input"
    assert gw.received(gw.primary) + gw.received(gw.backup) == []


def test_a_model_whose_tokenizer_is_an_estimate_takes_text_but_not_token_ids(gw: Gateway) -> None:
    gw.reset()
    r = embed(gw, ENC.encode_ordinary("hello"), "estimate-embedding")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["code"], err["param"], err["type"]) == ("token_input_unreadable", "input", "invalid_request_error")
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    assert embed(gw, ["hello"], "estimate-embedding").status_code == 200
    assert orjson.loads(orjson.dumps(gw.received(gw.primary)[0]["body"]["input"])) == ["hello"]


# -- files: base64 data URIs of a textual media type ------------------------------------------


def data_uri(text: str, media: str = "text/plain") -> str:
    return f"data:{media};base64," + base64.b64encode(text.encode()).decode()


def decoded_payloads(value: Any) -> list[str]:
    """Every base64 data URI in what a provider received, decoded (whatever its media type)."""
    if isinstance(value, str):
        head, sep, payload = value.partition(";base64,")
        return [base64.b64decode(payload).decode("utf-8", "replace")] if sep and head.startswith("data:") else []
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [t for v in items for t in decoded_payloads(v)]


def received_files(gw: Gateway) -> list[str]:
    return ["\n".join(decoded_payloads(r["body"])) for mock in (gw.primary, gw.backup) for r in gw.received(mock)]


def file_request(path: str, case: Case) -> dict[str, Any]:
    """One text file per string of the case (a value split over strings is split over files)."""
    if path == "/v1/responses":
        return {"model": "private-chat", "input": [{"role": "user", "content": [
            {"type": "input_text", "text": "summarise"},
            *({"type": "input_file", "filename": f"notes{i}.txt", "file_data": data_uri(text)}
              for i, text in enumerate(case.strings))]}]}
    return {"model": "private-chat", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "summarise"},
        *({"type": "file", "file": {"filename": f"notes{i}.md", "file_data": data_uri(text, "text/markdown")}}
          for i, text in enumerate(case.strings))]}]}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
def test_no_corpus_value_reaches_the_provider_in_a_text_file(gw: Gateway, path: str) -> None:
    gw.reset()
    with httpx.Client(timeout=30) as client:
        for case in CASES:
            r = client.post(f"{gw.url}{path}", json=file_request(path, case),
                            headers={"authorization": f"Bearer {gw.key}"})
            assert r.status_code == 200, r.text  # private-chat is approved for every tier: redacted, served
    files = received_files(gw)
    assert len(files) == len(CASES) and all(files)
    assert leaked(files, CASES) == []


def test_a_card_in_a_text_file_or_an_image_url_is_held_to_the_models_tier(gw: Gateway) -> None:
    gw.reset()
    card = "4111 1111 1111 1111"
    for part in ({"type": "file", "file": {"filename": "a.txt", "file_data": data_uri(f"card {card}")}},
                 {"type": "image_url", "image_url": {"url": f"https://img.example/receipt.png?card={card}"}}):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"}, timeout=30,
                       json={"model": "default-chat", "messages": [{"role": "user", "content": [part]}]})
        assert r.status_code == 403 and r.json()["error"]["code"] == "classification_violation", r.text
    assert gw.received(gw.primary) + gw.received(gw.backup) == []


def test_binary_files_and_clean_text_files_go_out_byte_for_byte(gw: Gateway) -> None:
    """Images, PDFs and audio are not read (docs/classification.md); nothing is re-encoded."""
    gw.reset()
    parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="}},
             {"type": "file", "file": {"filename": "a.pdf", "file_data": f"data:application/pdf;base64,{PDF}"}},
             {"type": "file", "file": {"filename": "b.txt", "file_data": data_uri("quarterly numbers look fine")}}]
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"}, timeout=30,
                   json={"model": "private-chat", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200, r.text
    (sent,) = [x["body"] for x in gw.received(gw.primary) + gw.received(gw.backup)]
    assert sent["messages"][0]["content"] == parts


# -- encoded runs padded past any bound ---------------------------------------------------


@pytest.mark.parametrize("name", list(padded_encodings("4111 1111 1111 1111")))
def test_an_encoded_card_behind_filler_never_reaches_the_provider(gw: Gateway, name: str) -> None:
    """Filler before a value in an encoded run (90 KB of base64, 5,000 URL escapes…) once hid
    it: only a run's start was decoded. Redacted whole for a model approved for it; refused
    for one that is not."""
    gw.reset()
    run = padded_encodings("4111 1111 1111 1111")[name]
    auth = {"authorization": f"Bearer {gw.key}"}
    for model, expected in (("private-chat", 200), ("default-chat", 403)):
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers=auth, timeout=60,
                       json={"model": model, "messages": [{"role": "user", "content": f"decode {run} please"}]})
        assert r.status_code == expected, r.text[:300]
    (sent,) = [x["body"] for x in gw.received(gw.primary) + gw.received(gw.backup)]
    content = sent["messages"][0]["content"]
    assert run[-40:] not in content and "[CREDIT_CARD_1]" in content, content[-200:]


# -- text in another encoding than UTF-8 --------------------------------------------------------

from ..test_scanner import ENCODED_NOTES, png, wav  # noqa: E402  (the same files as the unit test)


def encoded_parts(raw: bytes) -> dict[str, tuple[str, dict[str, Any]]]:
    """The carriers of one encoded text file, by name: (endpoint, body for private-chat)."""
    payload = base64.b64encode(raw).decode()
    uri = f"data:text/plain;base64,{payload}"
    chat = "/v1/chat/completions"

    def user(part: dict[str, Any]) -> dict[str, Any]:
        return {"model": "private-chat", "messages": [{"role": "user", "content": [part]}]}
    return {
        "chat file": (chat, user({"type": "file", "file": {"filename": "note.txt", "file_data": uri}})),
        "raw file_data": (chat, user({"type": "file", "file": {"filename": "note.txt", "file_data": payload}})),
        "input_audio": (chat, user({"type": "input_audio", "input_audio": {"format": "wav", "data": payload}})),
        "image_url": (chat, user({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{payload}"}})),
        "base64 in text": (chat, user({"type": "text", "text": f"decode: {payload}"})),
        "responses input_file": ("/v1/responses", {"model": "private-chat", "input": [{"role": "user", "content": [
            {"type": "input_file", "filename": "note.txt", "file_data": uri}]}]}),
    }


def seen_digits(body: Any) -> str:
    """Every base64 run the provider got, decoded in every encoding a reader might guess, and
    the body itself: the digits a card would leave as."""
    text = orjson.dumps(body).decode()
    out = [text]
    for run in re.findall(r"[A-Za-z0-9+/]{16,}={0,2}", text):
        try:
            raw = base64.b64decode(run + "=" * (-len(run) % 4))
        except ValueError:
            continue
        out += [raw.decode(codec, "replace") for codec in ("utf-8", "cp1252", "utf-16-le", "utf-16-be", "utf-32")]
    return "".join(c for c in "\n".join(out) if c.isdigit() or c == "\n")


@pytest.mark.parametrize("encoding", ENCODED_NOTES)
def test_a_text_file_in_another_encoding_never_reaches_the_provider_unread(gw: Gateway, encoding: str) -> None:
    """A cp1252 or UTF-16 text file (Windows' "ANSI" and "Unicode"), or one with a stray byte
    before it, was binary to the gateway and went out unread in every carrier. Now: refused
    for a model below its tier, redacted for one approved for it, through the openai SDK."""
    import openai
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    for name, (path, body) in encoded_parts(ENCODED_NOTES[encoding]).items():
        gw.reset()
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.post(path.removeprefix("/v1"), cast_to=object, body={**body, "model": "default-chat"})
        assert refused.value.code == "classification_violation", name
        assert gw.received(gw.primary) + gw.received(gw.backup) == [], name
        client.post(path.removeprefix("/v1"), cast_to=object, body=body)
        (sent,) = [r["body"] for r in gw.received(gw.primary) + gw.received(gw.backup)]
        assert "4111111111111111" not in seen_digits(sent) and "123456789" not in seen_digits(sent), name


def test_a_real_image_and_recording_go_out_byte_for_byte(gw: Gateway) -> None:
    """Real binaries are still not read: nothing found, nothing re-encoded."""
    gw.reset()
    image, audio = base64.b64encode(png(256, 256)).decode(), base64.b64encode(wav(2.0)).decode()
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
             {"type": "input_audio", "input_audio": {"format": "wav", "data": audio}},
             {"type": "file", "file": {"filename": "a.wav", "file_data": f"data:audio/wav;base64,{audio}"}}]
    r = httpx.post(f"{gw.url}/v1/chat/completions", headers={"authorization": f"Bearer {gw.key}"}, timeout=60,
                   json={"model": "default-chat", "messages": [{"role": "user", "content": parts}]})
    assert r.status_code == 200, r.text
    (sent,) = [x["body"] for x in gw.received(gw.primary) + gw.received(gw.backup)]
    assert sent["messages"][0]["content"] == parts


# -- encoded values in query strings -----------------------------------------------------------


def test_a_url_encoded_value_in_a_query_string_never_reaches_the_provider(gw: Gateway) -> None:
    """`?q=card%204111%20…` or `?to=jane%40…`: a run right after `name=` was never decoded, so
    an image URL, a link in a message or a form body pasted into one carried it out. Now the
    card holds the request to the model's tier and the address is redacted, through the SDK."""
    import openai
    client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=gw.key, max_retries=0)
    card_url = "https://shop.example/search?q=card%204111%201111%201111%201111&page=2"
    mail_url = "https://news.example/unsubscribe?to=jane.doe%40example.com&list=7"
    gw.reset()
    stray = "https://shop.example/search?q=%FF%20card%204111%201111%201111%201111"  # a byte that is no UTF-8
    for content in ([{"type": "image_url", "image_url": {"url": card_url}}], f"open {card_url}", f"open {stray}"):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": content}])
        assert refused.value.code == "classification_violation"
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    for content in ([{"type": "image_url", "image_url": {"url": mail_url}}], f"open {mail_url}"):
        client.chat.completions.create(model="default-chat", messages=[{"role": "user", "content": content}])
    client.chat.completions.create(model="private-chat", messages=[{"role": "user", "content": f"open {card_url}"}])
    sent = orjson.dumps([r["body"] for r in gw.received(gw.primary) + gw.received(gw.backup)]).decode()
    assert sent.count("[EMAIL_1]") == 2 and "[CREDIT_CARD_1]" in sent
    assert "jane.doe" not in sent and "%204111" not in sent and "4111%20" not in sent


def test_a_value_in_wrapped_base64_never_reaches_the_provider(gw: Gateway) -> None:
    """`base64 notes.txt` pasted into a prompt (76 columns; PEM 64, MIME with CRLF): each line
    was decoded alone, so a card whose base64 crossed a line break went out. Now the lines are
    one run: held to the model's tier, and redacted whole for a model approved for it."""
    import anthropic
    from ..test_scanner import _wrapped
    client = anthropic.Anthropic(base_url=gw.url, api_key=gw.key, max_retries=0)
    gw.reset()
    blocks = [_wrapped("x" * shift + "Please charge card 4111 1111 1111 1111 for the order, thanks a lot.", width, crlf)
              for shift in range(0, 76, 4) for width, crlf in ((76, False), (64, False), (76, True))]
    for block in blocks:
        with pytest.raises(anthropic.PermissionDeniedError):
            client.messages.create(model="default-chat", max_tokens=16,
                                   messages=[{"role": "user", "content": f"decode:\n{block}\nthanks"}])
    assert gw.received(gw.primary) + gw.received(gw.backup) == []
    for block in blocks:
        client.messages.create(model="private-chat", max_tokens=16,
                               messages=[{"role": "user", "content": f"decode:\n{block}\nthanks"}])
    sent = [r["body"]["messages"][0]["content"] for r in gw.received(gw.primary) + gw.received(gw.backup)]
    assert len(sent) == len(blocks) and all("[CREDIT_CARD_1]" in content for content in sent)
    assert not any(line in content for block, content in zip(blocks, sent) for line in block.split()[1:-1])
