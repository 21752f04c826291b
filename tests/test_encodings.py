"""Encodings a hostile caller tries first to move a restricted value past the scanner: hex
bytes as a hex dump prints them, base32, quoted-printable, base64 three levels deep. Each is
found and redacted as the plain value is; ordinary text that merely looks like one (hashes,
UUIDs, MAC and IPv6 addresses, upper-case words) is not."""

from __future__ import annotations

import base64
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_extproc.policy import DecisionParams, Scanner, StreamRedactor, redact

SCANNER = Scanner.compile()
CARD = "4111111111111111"
VALUES = {"credit_card": "4111 1111 1111 1111", "us_ssn": "SSN 123-45-6789", "email": "jane.doe@example.com",
          "iban": "GB82WEST12345698765432", "aws_access_key": "AKIAIOSFODNN7EXAMPLE"}


def hex_dump(raw: bytes, sep: str = " ", prefix: str = "", per_line: int = 0) -> str:
    cells = [f"{prefix}{b:02x}" for b in raw]
    if not per_line:
        return sep.join(cells)
    return "\n".join(sep.join(cells[i:i + per_line]) for i in range(0, len(cells), per_line))


def b32(text: str, pad: bool = True) -> str:
    out = base64.b32encode(text.encode()).decode()
    return out if pad else out.rstrip("=")


def qp(text: str, width: int = 0) -> str:
    """Every byte escaped, soft line breaks every `width` characters."""
    cells = [f"={b:02X}" for b in text.encode()]
    if not width:
        return "".join(cells)
    return "=\n".join("".join(cells[i:i + width]) for i in range(0, len(cells), width))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


ENCODINGS = {
    "hex dump": lambda t: hex_dump(t.encode()),
    "hex dump upper": lambda t: hex_dump(t.encode()).upper(),
    "hex 0x": lambda t: hex_dump(t.encode(), " ", "0x"),
    "hex 0x commas": lambda t: hex_dump(t.encode(), ", ", "0x"),
    "hex colons": lambda t: hex_dump(t.encode(), ":"),
    "hex \\x": lambda t: hex_dump(t.encode(), "", "\\x"),
    "hex dump wrapped": lambda t: hex_dump(t.encode(), " ", "", 8),
    "hex xxd groups": lambda t: " ".join(t.encode().hex()[i:i + 4] for i in range(0, 2 * len(t), 4)),
    "base32": b32,
    "base32 unpadded": lambda t: b32(t, pad=False),
    "base32 lower": lambda t: b32(t).lower(),
    "quoted-printable": qp,
    "quoted-printable soft breaks": lambda t: qp(t, 4),
    "base64 x3": lambda t: b64(b64(b64(t))),
    "base32 of base64": lambda t: b32(b64(t)),
}


@pytest.mark.parametrize("rule", sorted(VALUES))
@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_an_encoded_value_counts_like_the_plain_one(encoding: str, rule: str) -> None:
    payload = ENCODINGS[encoding](f"value {VALUES[rule]} ok")
    text = f"decode this: {payload} thanks"
    findings = SCANNER.scan(text)
    assert {f.rule for f in findings} == {rule}, (encoding, payload)
    start = text.index(payload)  # (quoted-printable ends with the word after its last soft break, the plain
    # words after that hold nothing)
    value = ENCODINGS[encoding](VALUES[rule])
    if encoding == "hex \\x":  # (each escape is read as its character, as a reference is: the value's own)
        at = text.index(value)
        assert all(at <= f.start < f.end <= at + len(value) for f in findings), findings
    else:
        assert all(f.start == start and f.end >= start + len(payload) - 6 for f in findings)
    decision = SCANNER.decide(findings, DecisionParams())
    plain = SCANNER.decide(SCANNER.scan(f"value {VALUES[rule]} ok"), DecisionParams())
    assert (decision.block, decision.blocked_rules) == (plain.block, plain.blocked_rules)
    if not decision.block:  # redacted: the whole run (the value's escapes) becomes the placeholder
        out, _ = redact(text, decision.redact)
        assert out.startswith("decode this: ") and out.endswith("thanks") and "[" in out
        assert (value if encoding == "hex \\x" else payload[:-6]) not in out, out


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(ENCODINGS)), st.sampled_from(sorted(VALUES)),
       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters="@"), max_size=12),
       st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e, blacklist_characters="@"), max_size=12))
def test_encoded_text_holds_what_the_plain_text_holds(encoding: str, rule: str, before: str, after: str) -> None:
    inner = f"{before} {VALUES[rule]} {after}"
    payload = ENCODINGS[encoding](inner)
    plain = {f.rule for f in SCANNER.scan(f"see {inner} end")}
    assert {f.rule for f in SCANNER.scan(f"see {payload} end")} == plain, (encoding, inner, payload)


@pytest.mark.parametrize("text", [
    "commit 3f786850e387550fdab836ed7e6dc881de23001b and e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    f"request id {uuid.UUID(int=0x123456789abcdef0123456789abcdef0)} failed",
    "the NIC aa:bb:cc:dd:ee:ff and 00:1a:2b:3c:4d:5e and 41:42:43:44:45:46, bridge 02-42-ac-11-00-02",
    "READTHEDOCUMENTATIONFIRST and THISISAVERYLONGUPPERCASESENTENCE ok",
    "bytes 00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f, scores 10 20 30 40 50 60 70 80 90",
    "x=10+y=20 and width=3D100 height=3D200 in the template",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567 is the base32 alphabet",
])
def test_ordinary_text_that_looks_encoded_is_left_alone(text: str) -> None:
    assert SCANNER.scan(text) == []


def test_ipv6_addresses_are_read_as_addresses_not_hex() -> None:
    text = "host fe80::1ff:fe23:4567:890a and 2001:0db8:85a3:0000:0000:8a2e:0370:7334"
    assert {f.rule for f in SCANNER.scan(text)} == {"ipv6"}


@settings(max_examples=80, deadline=None)
@given(st.binary(min_size=8, max_size=40))
def test_hex_dumps_and_base32_of_bytes_find_only_what_the_bytes_hold(raw: bytes) -> None:
    """What is found in the dump as written (digits a phone rule reads, an IPv6 address) aside."""
    held = {f.rule for f in SCANNER.scan(f"data {raw.decode('utf-8', 'replace')} end")}
    for text in (hex_dump(raw), hex_dump(raw, ":"), base64.b32encode(raw).decode()):
        assert all(f.rule in held or f.value in text for f in SCANNER.scan(f"data {text} end"))


def test_depth_is_still_bounded() -> None:
    assert SCANNER.scan(f"x {b64(b64(b64(b64(f'card {CARD}'))))} y") == []  # four levels: not decoded


@pytest.mark.parametrize("value", [f"card {CARD}", "mail jane.doe@example.com please"])
@pytest.mark.parametrize("encoding", ["hex dump", "hex 0x commas", "hex dump wrapped", "quoted-printable",
                                      "quoted-printable soft breaks", "base32", "base64 x3"])
def test_an_encoded_value_in_a_stream_is_redacted(encoding: str, value: str) -> None:
    payload = ENCODINGS[encoding](value)
    text = f"Here it is: {payload} done."
    red = StreamRedactor(SCANNER, DecisionParams(), holdback_chars=64)
    out = "".join(red.feed(text[i:i + 7]) for i in range(0, len(text), 7)) + red.flush()
    assert CARD not in out and payload not in out
    assert out in ("Here it is: [CREDIT_CARD_1] done.", "Here it is: [EMAIL_1] done.")


@pytest.mark.parametrize("sep", ["\u00a0", "\u200b", "\u3000", "\u2009", "\ufeff", "\u00ad"])
@pytest.mark.parametrize("encode", [lambda raw: base64.b64encode(raw).decode(), lambda raw: raw.hex()],
                         ids=["base64", "hex"])
def test_encoded_text_with_unicode_spaces_between_the_groups_is_text(sep: str, encode) -> None:
    """Unicode spaces and format characters are text: three among thirty characters made the
    decoded run binary, so a card so separated, then encoded, went out (until 2026-12-06)."""
    text = f"card 4111{sep}1111{sep}1111{sep}1111 ok"
    payload = encode(text.encode())
    assert [f.rule for f in SCANNER.scan(f"x {payload} y")] == ["credit_card"]
