"""The router-level translation of a provider's answer (processors/provider_response.py):
a translator that cannot read the provider's bytes never breaks the client's answer."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from gateway_extproc.config import Backend, Provider
from gateway_extproc.errors import GatewayError
from gateway_extproc.processors.provider_response import CredentialCut, ProviderResponse, client_error, echoed_headers

ANTHROPIC = Backend("claude/claude-x", Provider("claude", "anthropic", "https://api.example/v1", "/v1", None, None),
                    "claude-x", 0, 1)
GOOD = b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\n\n'
WRONG_SHAPE = b'data: {"type":"content_block_delta","index":0,"delta":"oops"}\n\n'  # AttributeError inside


def test_a_broken_event_keeps_what_came_before_and_ends_the_stream() -> None:
    answer = ProviderResponse(ANTHROPIC, 200, streamed=True)
    out = answer.feed(GOOD + WRONG_SHAPE + GOOD, False)
    first, error, rest = out.split(b"\n\n")
    assert orjson.loads(first[6:])["choices"][0]["delta"]["content"] == "Hi"
    assert orjson.loads(error[6:])["error"]["code"] == "provider_error" and rest == b""
    assert answer.feed(GOOD, False) == b"" and answer.feed(b"", True) == b""


def test_an_unreadable_body_under_200_goes_out_as_502() -> None:
    answer = ProviderResponse(ANTHROPIC, 200, streamed=False)
    body = orjson.loads(answer.body(b"<html>upstream proxy error</html>"))
    assert body["error"]["code"] == "provider_error" and answer.status == 502


def test_a_provider_error_keeps_its_status() -> None:
    answer = ProviderResponse(ANTHROPIC, 529, streamed=True)
    body = orjson.loads(answer.body(b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'))
    assert body["error"]["message"] == "Overloaded" and answer.status == 529


def test_an_answer_is_read_as_what_was_asked_for_whatever_its_label() -> None:
    """The router passes whether the provider was asked for a stream, not the label."""
    assert ProviderResponse(ANTHROPIC, 200, streamed=True).stream is not None
    assert ProviderResponse(ANTHROPIC, 200, streamed=False).stream is None
    assert ProviderResponse(ANTHROPIC, 429, streamed=True).stream is None  # an error is a JSON body


# -- a provider's error as the client gets it (client_error) ------------------------------

KEY = "sk-live-0123456789abcdefghij"


def test_a_401_is_the_gateways_credential_refused_without_the_providers_words() -> None:
    with pytest.raises(GatewayError) as raised:
        client_error(401, orjson.dumps({"error": {"message": f"Incorrect API key provided: {KEY}"}}), (KEY,), "p/m", None)
    assert raised.value.code == "provider_auth_failed" and raised.value.status == 502
    assert KEY not in raised.value.body().decode() and "Incorrect" not in raised.value.body().decode()


def test_non_openai_error_bodies_arrive_in_the_openai_shape_with_the_providers_message() -> None:
    for raw, said in [(b"<html>502 Bad Gateway</html>", None), (b'{"detail": "Model is loading"}', "Model is loading"),
                      (b'{"error": "quota"}', "quota"), (b'\xff\xfe', None), (b"[1, 2]", None)]:
        error = orjson.loads(client_error(503, raw, (KEY,), "p/m", None))["error"]
        assert error["code"] == "provider_error" and error["type"] == "server_error"
        assert (said in error["message"]) if said else "no OpenAI error object" in error["message"]


def test_an_openai_error_keeps_its_fields() -> None:
    raw = orjson.dumps({"error": {"message": "context too long", "type": "invalid_request_error",
                                  "code": "context_length_exceeded", "param": "messages"}})
    assert orjson.loads(client_error(400, raw, (KEY,), "p/m", None)) == orjson.loads(raw)


@pytest.mark.parametrize("error", [
    {"message": "Mock error", "type": "server_error", "code": None, "param": None},  # OpenAI's own 5xx
    {"message": "Mock error", "type": "server_error"},
    {"message": "busy", "code": 503},  # an OpenAI-compatible server's number
    {"message": "busy", "code": ""},
    {"type": "server_error", "code": None},
    {"message": ["not", "text"], "type": 7, "code": None, "param": None},
])
def test_an_openai_error_without_a_code_of_its_own_gets_provider_error_and_every_field(error: dict) -> None:
    """Every error a client reads has the four fields and a code: one the provider named (its
    docs explain it) or `provider_error` (the runbook's)."""
    out = orjson.loads(client_error(503, orjson.dumps({"error": error}), (KEY,), "p/m", None))["error"]
    assert out["code"] == "provider_error" and out["param"] == error.get("param")
    assert isinstance(out["message"], str) and out["message"] and isinstance(out["type"], str)
    assert out["message"] == error["message"] if isinstance(error.get("message"), str) else "HTTP 503" in out["message"]


def _escaped(text: str) -> bytes:
    """JSON as a careless encoder writes it: `/` escaped, every non-letter as \\uXXXX."""
    return ("".join(c if c.isalnum() else f"\\u{ord(c):04x}" for c in text)).encode()


@settings(max_examples=300)
@given(before=st.text(max_size=60), after=st.text(max_size=60),
       wrap=st.sampled_from(["json", "detail", "text", "escaped"]),
       credential=st.sampled_from([KEY, "AKIAEXAMPLEKEYID0000:wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"]),
       part=st.sampled_from([0, 1, 2]))
def test_the_credential_never_survives_wherever_a_provider_puts_it(before: str, after: str, wrap: str,
                                                                   credential: str, part: int) -> None:
    shown = (credential, *credential.split(":"))[min(part, credential.count(":") + 1)]
    said = before + shown + after
    raw = {"json": orjson.dumps({"error": {"message": said, "type": "x", "code": None, "param": None}}),
           "detail": orjson.dumps({"detail": said}), "text": said.encode(),
           "escaped": b'{"error": {"message": "' + _escaped(said) + b'"}}'}[wrap]
    out = client_error(400, raw, (credential,), "p/m", None).decode()
    assert shown not in out and shown not in orjson.loads(out)["error"]["message"]


def test_headers_echoing_the_credential_are_named_for_removal() -> None:
    headers = {":status": "200", "content-type": "application/json", "x-debug": "seen sk-live-ABCDEF123456",
               "x-sk-live-abcdef123456": "1", "www-authenticate": 'Bearer token="AKIAEXAMPLE00"', "x-short": "abc"}
    assert echoed_headers(headers, ("sk-live-ABCDEF123456",)) == ("x-debug", "x-sk-live-abcdef123456")
    assert echoed_headers(headers, ("AKIAEXAMPLE00:secretsecret",)) == ("www-authenticate",)  # Bedrock's parts
    assert echoed_headers(headers, ("abc:def",)) == ()  # parts too short to tell from innocent text
    assert echoed_headers(headers, ()) == ()
    assert echoed_headers(headers, ("sk-other-999999999999", "AKIAEXAMPLE00:secretsecret")) == ("www-authenticate",)


CREDENTIAL = "sk-live-ABCDEF/123456"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="sk-live/ABC\\ \n", max_size=60), st.text(alphabet="sk-live/ABC\\ \n", max_size=60),
       st.sampled_from([CREDENTIAL, CREDENTIAL.replace("/", "\\/")]), st.lists(st.integers(0, 200), max_size=8))
def test_a_credential_is_cut_however_the_pieces_split_it(before: str, after: str, written: str, cuts: list[int]) -> None:
    """Whatever text surrounds it (even half-credentials) and wherever a stream splits it, the
    credential never comes out, and the pieces give what the whole answer gives."""
    data = f"{before}{written}{after}{written}".encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    cut = CredentialCut.of((CREDENTIAL,))
    assert cut is not None
    out = b"".join(cut.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert CREDENTIAL.encode() not in out and CREDENTIAL.replace("/", "\\/").encode() not in out
    assert out == CredentialCut.of((CREDENTIAL,)).whole(data)  # type: ignore[union-attr]
    assert cut.found


def test_an_answer_without_the_credential_is_the_same_object() -> None:
    cut = CredentialCut.of((CREDENTIAL,))
    assert cut is not None
    body = b'{"choices": [{"message": {"content": "sk-live is a prefix"}}]}\n\n'
    assert cut.whole(body) is body and cut.feed(body, False) is body and not cut.found
    assert CredentialCut.of(()) is None and CredentialCut.of(("short",)) is None


def test_a_keys_label_is_no_piece_of_it_but_its_secret_is() -> None:
    """`sk-backup-…` and a backend named `mock-backup` share `k-backup`: the label before a
    key's last `-`/`_` (within 16 characters) is public, so a header naming the backend stays;
    any 8 characters of the rest are a piece. A whole quote loses the label too."""
    key = "sk-backup-Zq81mWx0Tt4Lp2Vy"
    headers = {"x-gateway-backend": "mock-backup/mock-secondary", "x-debug": "key ending mWx0Tt4Lp2Vy"}
    assert echoed_headers(headers, (key,)) == ("x-debug",)
    raw = orjson.dumps({"error": {"message": f"bad key {key} (the one ending 0Tt4Lp2Vy) for mock-backup",
                                  "type": "invalid_request_error", "code": None, "param": None}})
    message = orjson.loads(client_error(400, raw, (key,), "p/m", None))["error"]["message"]
    assert "sk-backup" not in message and "0Tt4Lp2Vy" not in message and "mock-backup" in message


def test_every_gateway_credential_is_cut_not_only_the_answering_backends() -> None:
    """A provider quoting another backend's key (a shared proxy, a debug echo of the
    gateway's config) hands out a gateway secret just the same."""
    other, own = "sk-backup-fkTTvcnRLKgyEwzYepvg", "sk-primary-g40NvvVHnbN7IRYb4dTA"
    raw = orjson.dumps({"error": {"message": f" key {other} ", "type": "invalid_request_error",
                                  "code": None, "param": None}})
    out = client_error(400, raw, (other, own), "mock/m", None).decode()
    assert other not in out and other[-8:] not in out and "[credential removed]" in out
    cut = CredentialCut.of((other, own))
    assert cut is not None and other.encode() not in cut.feed(f"data: {other} {own}\n\n".encode(), True)


_SECRETS = ("sk-live-ABCDEF/123456", 'AKIAEXAMPLE00:secret/sec"ret', "tok_ABCDEF/12")
_FORMS = [f for s in (*_SECRETS, 'secret/sec"ret', "AKIAEXAMPLE00")
          for f in {s, orjson.dumps(s)[1:-1].decode(), orjson.dumps(s)[1:-1].decode().replace("/", "\\/")}]


@settings(max_examples=500, deadline=None)
@given(st.lists(st.one_of(st.text(alphabet='sk-liveABC/\\ \n"AKIAEXMPL0:secr', max_size=20), st.sampled_from(_FORMS)),
                max_size=8), st.lists(st.integers(0, 300), max_size=10))
def test_no_credential_of_several_survives_a_stream_however_split(parts: list[str], cuts: list[int]) -> None:
    """Several credentials (a Bedrock pair among them), each whole, in part or JSON-escaped,
    next to look-alikes, split anywhere: none comes out in any form."""
    data = "".join(parts).encode()
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:])] or [b""]
    cut = CredentialCut.of(_SECRETS)
    assert cut is not None
    out = b"".join(cut.feed(p, i == len(pieces) - 1) for i, p in enumerate(pieces))
    assert not any(form.encode() in out for form in _FORMS)


def test_a_label_inside_a_bedrock_pairs_secret_is_no_piece_of_it() -> None:
    """With every credential cut from every answer, the Bedrock pair `AKID…:sk-backup-…` (the
    test stacks' shape) must not make `mock-backup/mock-secondary`, the header naming another
    backend, read as a piece of it; its secret's own pieces still are."""
    pair = "AKIDGATEWAYTEST:sk-backup-qz6XdYu5wqm7FtSCib8o"
    headers = {"x-gateway-backend": "mock-backup/mock-secondary", "x-debug": "ends u5wqm7FtSCib8o"}
    assert echoed_headers(headers, ("sk-primary-El4YfFP3mSZ4n8KQEHig", pair)) == ("x-debug",)
