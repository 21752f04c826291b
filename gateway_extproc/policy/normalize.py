"""Text normalization before detection, with a map back to the original offsets.

One keystroke should not move a card number past the gateway: `4111` in fullwidth or
Arabic-Indic digits, a zero-width space between groups, a fullwidth `＠` in an e-mail. The
detectors therefore run on a normalized copy of each string:

- Unicode NFKC, character by character (compatibility forms to their plain form: fullwidth
  letters, digits and punctuation, ligatures, circled digits, `﹫`);
- format characters (category Cf: zero-width space/joiner, bidi marks, soft hyphen, word
  joiner, BOM) and other invisible default-ignorables (variation selectors, Hangul fillers,
  combining grapheme joiner) removed, and so are the decorations of "fancy text" (keycaps,
  strike-through, underline, enclosing circles: enclosing marks and the marks for symbols);
- every Unicode decimal digit (Nd: Arabic-Indic, Devanagari, Thai, mathematical…) mapped to
  its ASCII digit;
- every space separator (Zs: NBSP, thin, ideographic…) and line/paragraph separator to a
  plain space, and so every symbol NFKC leaves as it is (So, Sm: emoji, arrows, `×`; since
  2026-12-07); every dash (Pd, minus sign) to `-`; ideographic and halfwidth full stops to `.`;
- Cyrillic and Greek letters that look like Latin ones (`а`, `е`, `о`, `і`, `ο`, …) to those.
- Unicode tag characters (U+E0020–E007E), invisible yet read by some models as the ASCII they
  mirror ("ASCII smuggling": a hidden `ignore previous instructions`), to that ASCII.

Written-out `@`/`.` ("(at)", "[dot]", " at ") and the separators numeric detectors accept are
handled by the detectors' patterns, not here, so ASCII text is returned unchanged without
looking at it further (the common case costs one `str.isascii`).

The mapping is one `str.translate` table built once (lazily) over the planes in use, so the
cost is the C translate loop; an offset map is built only when some character changed
length (deleted or expanded), from the positions of those characters alone.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal, InvalidOperation
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from html.entities import html5

import orjson

# Invisible characters outside Cf that are used to split values: combining grapheme joiner,
# Hangul fillers, Mongolian and standard variation selectors, tag-like ideographic ones; and
# decorations "fancy text" and "Zalgo text" generators put on every character: the combining
# diacritical marks (accents stacked on digits and spaces: `4́1́1́1`; a letter's accent goes too,
# which no detector or phrase match needs), the marks for symbols (keycap `4️⃣`, enclosing
# circle and square) and the combining half marks. Enclosing marks (Me) go too (`_mapped`).
# (Marks of other scripts, such as Devanagari or Thai vowel signs, are letters there: kept.)
_EXTRA_IGNORABLE = {0x115F, 0x1160, 0x3164, 0xFFA0, *range(0x180B, 0x1810),
                    *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0), *range(0x0300, 0x0370),
                    *range(0x1AB0, 0x1B00), *range(0x1DC0, 0x1E00), *range(0x20D0, 0x2100),
                    *range(0xFE20, 0xFE30)}
_EXTRA_IGNORABLE |= {0x17B4, 0x17B5}  # Khmer inherent vowels: default-ignorable, invisible
# Default-ignorable code points Unicode has not assigned yet: renderers must not show them
# either (`4111\ufff01111…` displays as `41111111…`).
_UNASSIGNED_IGNORABLE = frozenset({0x2065, *range(0xFFF0, 0xFFF9), 0xE0000, *range(0xE0002, 0xE0020),
                                   *range(0xE0080, 0xE0100), *range(0xE01F0, 0xE1000)})
# Full stops of other scripts, and the middle dots (`jane.doe@example·com` reads as an address).
_DOTS = {o: "." for o in (0x3002, 0xFF0E, 0xFF61, 0x2024, 0xFE52, 0x00B7, 0x2219, 0x22C5, 0x2027, 0x0589, 0x06D4,
                          0x30FB, 0xFF65, 0x2E31, 0x2E33, 0x2022, 0x16EB, 0xA78F, 0x02D9, 0x1362, 0x0964)}
# Control characters (NUL, form feed, vertical tab, DEL, the C1 block...) and the blank
# Braille pattern are read as a space: invisible between two digits, they hid a card
# (`4111\x001111...`), and a caller's U+001F is not the scanner's boundary between strings.
_BLANKS = frozenset({*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0), 0x2800}) - {0x85}
_ASCII_BLANKS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_ASCII_TABLE = {o: " " for o in _BLANKS if o < 0x80}
# Letters of other scripts that look like Latin ones (Unicode's confusables: Cyrillic, Greek,
# Armenian, Cherokee, and Latin's own IPA letters and small capitals, none of which NFKC folds):
# `іgnоrе` with Cyrillic і, о, е reads as `ignore` to a model, `jаne@exаmple.com` as an address,
# and so do `ɪɢɴᴏʀᴇ` and `jane@exampլe.cօm`. Detection reads them as the Latin letter (a
# keyword's letters match as read so, `detectors.phrase_char`: a keyword written in Cyrillic
# still matches Cyrillic text). Cherokee's small letters are read as their capitals are.
_CHEROKEE = dict(zip("ᎠᎡᎢᎥᎩᎪᎫᎬᎳᎷᎻᎽᏀᏂᏃᏏᏒᏚᏞᏟᏢᏦᏴᏙ", "DRTiyAJEWMHyGhZbRSLCPKBV"))
_LOOKALIKES = dict(zip(
    map(ord, "аеорсухіјѕһԁԛԝӏѵүк" "АВЕКМНОРСТХІЈЅҮԚԜӀ" "αοικνρυχϲϳ" "ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ"
        "օսհոցՕՍԼՏ" "ɑɡɩɪʏᴀʙᴄᴅᴇɢʜᴊᴋʟᴍɴᴏᴘʀꜱᴛᴜᴠᴡᴢ"),
    "aeopcyxijshdqwlvyk" "ABEKMHOPCTXIJSYQWI" "aoikvpuxcj" "ABEZHIKMNOPTYX"
    "ouhngOULS" "agiiyabcdeghjklmnoprstuvwz"))
_LOOKALIKES.update({ord(c): latin for c, latin in _CHEROKEE.items()})
_LOOKALIKES.update({ord(c.lower()): latin.lower() for c, latin in _CHEROKEE.items()})
_PLANES = (range(0x80, 0x20000), range(0xE0000, 0xE1000))  # BMP, SMP (math digits), tags and selectors


@dataclass(frozen=True, slots=True)
class _Tables:
    translate: dict[int, str | None]
    resize: re.Pattern[str]  # characters whose replacement is not exactly one character


_tables: _Tables | None = None


def _mapped(ch: str) -> str | None:
    o = ord(ch)
    if 0xE0020 <= o <= 0xE007E:  # tag characters: invisible, but read as the ASCII they mirror
        return chr(o - 0xE0000)
    if o in _EXTRA_IGNORABLE or unicodedata.category(ch) in ("Cf", "Me"):
        return ""
    if o in _DOTS:
        return _DOTS[o]
    if o in _BLANKS:
        return " "
    if o in _LOOKALIKES:
        return _LOOKALIKES[o]
    if ch.isdecimal():
        return str(unicodedata.decimal(ch))
    cat = unicodedata.category(ch)
    if cat in ("Zs", "Zl", "Zp") or ch == "\x85":
        return " "
    if cat == "Pd" or ch == "\u2212":
        return "-"
    norm = unicodedata.normalize("NFKC", ch)
    if norm == ch:  # (a symbol, emoji or arrow between groups hid a card: `4111🙂1111🙂…`)
        return " " if cat in ("So", "Sm") else None
    out = []
    for c in norm:  # NFKC may give non-ASCII digits, spaces or dashes again
        m = _mapped(c) if ord(c) >= 0x80 else None
        out.append(c if m is None else m)
    return "".join(out)


def tables() -> _Tables:
    """The translate table (built on first use, ~0.2 s; shared by every scanner)."""
    global _tables
    if _tables is None:
        table: dict[int, str | None] = {}
        resize: list[int] = []
        table.update(_ASCII_TABLE)
        for plane in _PLANES:
            for o in plane:
                ch = chr(o)
                if o in _UNASSIGNED_IGNORABLE:
                    table[o] = None
                    resize.append(o)
                    continue
                if unicodedata.category(ch) in ("Cn", "Cs", "Co"):
                    continue
                m = _mapped(ch)
                if m is None:
                    continue
                table[o] = m if m else None
                if len(m) != 1:
                    resize.append(o)
        _tables = _Tables(table, re.compile(_char_class(resize)))
    return _tables


def _char_class(codes: list[int]) -> str:
    parts: list[str] = []
    start = prev = None
    for o in sorted(codes):
        if prev is not None and o == prev + 1:
            prev = o
            continue
        if start is not None:
            parts.append(_range(start, prev))
        start = prev = o
    if start is not None:
        parts.append(_range(start, prev))
    return "[" + "".join(parts) + "]" if parts else "(?!)"


def _range(a: int, b: int | None) -> str:
    esc = lambda o: re.escape(chr(o))  # noqa: E731
    return esc(a) if a == b else f"{esc(a)}-{esc(b)}"


@dataclass(frozen=True, slots=True)
class Normalized:
    """`text` (normalized) and the way back to the original string's offsets.

    `_starts`/`_orig` are the normalized and original offsets where each changed-length
    stretch begins; between two of them offsets move in step. Empty: the identity."""

    text: str
    source_len: int
    _starts: tuple[int, ...] = ()
    _orig: tuple[int, ...] = ()
    _spans: tuple[tuple[int, int, int, int], ...] = ()  # (norm start, norm end, orig start, orig end)

    @property
    def identity(self) -> bool:
        return not self._spans

    def start(self, i: int) -> int:
        """Original offset of the character at normalized offset `i` (a value's start)."""
        if not self._spans:
            return i
        k = bisect_right(self._starts, i) - 1
        if k < 0:
            return i
        ns, ne, os_, oe = self._spans[k]
        if i < ne:  # inside an expansion: the whole original character
            return os_
        return oe + (i - ne)

    def end(self, i: int) -> int:
        """Original offset just past the character before normalized offset `i` (a value's end)."""
        if not self._spans or i == 0:
            return i
        k = bisect_right(self._starts, i - 1) - 1
        if k < 0:
            return i
        ns, ne, os_, oe = self._spans[k]
        if i <= ne:  # ends inside (or right after) an expansion: include the whole character
            return oe if i > ns else os_
        return oe + (i - ne)


# What a chat client's Markdown or HTML renderer, or a terminal, shows differently from the
# text: an HTML character reference is the character it stands for (numeric: the `;`
# optional, as browsers read it; named: HTML5's names, with their `;`), and a tag, a comment
# or an ANSI escape sequence shows as nothing (but `<at>` and `<dot>`: an address written
# out). `4111<b></b>1111 1111 1111`, `4111&nbsp;1111…` and `4111\x1b[0m1111…` show a card.
# A tag whose attributes hold a digit or an `@` is read as written: the model reads them,
# and `<a 4111 1111 1111 1111>` or `<img alt="jane@example.com">` showed nothing. The
# scanner reads such text shown as well (`rendered`): `<td width=40>` cells split a card.
# A backslash escape (`\u0034`, `\x34`, `\U00000034`) is the character a model, or a program
# printing the string, reads: one digit or an `@` so written hid a value, as a reference did.
_TAG = r"</?(?![Aa][Tt]\b|[Dd][Oo][Tt]\b)[A-Za-z][A-Za-z0-9-]{0,15}"


def _markup(attributes: str, joins: str = "") -> re.Pattern[str]:
    return re.compile(r"&#(?:([0-9]{1,7})|[xX]([0-9A-Fa-f]{1,6}));?|&([A-Za-z][A-Za-z0-9]{1,31};)"
                      rf"|(<!--.{{0,200}}?-->|{_TAG}(?:\s{attributes}{{0,200}})?/?>{joins}"
                      r"|\x1b\[[0-9;?]{0,16}[ -/]{0,2}[@-~])"
                      r"|\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"  # a surrogate pair
                      r"|\\(?:u([0-9A-Fa-f]{4})|x([0-9A-Fa-f]{2})|U([0-9A-Fa-f]{8}))", re.S)


_MARKUP = _markup(r"[^<>\d@＠]")
_ESCAPE_START = re.compile(r"\\[uxU][0-9A-Fa-f]")  # (code with backslashes and no escape: the fast path)
# Strings put together in code (`"sk-proj-abc" + "def…"`, `'4111' + '1111'`): one string as shown.
_JOIN = r"[\"'`]\s{0,16}\+\s{0,16}[\"'`]"
_SHOWN = _markup(r"[^<>]", "|" + _JOIN)
_JOIN_RE = re.compile(_JOIN)
_TAG_HOLDING = re.compile(rf"{_TAG}\s[^<>]{{0,200}}?[\d@＠]")  # a tag whose attributes hold a digit or `@`
_WHOLE_TAG = re.compile(rf"{_TAG}\s[^<>]{{0,200}}>")  # (as `_MARKUP` reads a tag with attributes)
_HOLDS = re.compile("[\\d@＠]")
_TAGS_SHOWN = _markup(r"[^<>]")  # (`_SHOWN` without the joins: a stream has no join cut at a delta's end)


# Named references the e-mail rule reads as written-out forms of `@` and `.` (`jane at
# example&period;com` is obfuscation; `jane at example.com` is not taken for an address).
_WRITTEN_OUT = frozenset({"commat;", "period;"})


def normalize(text: str) -> Normalized:
    if "&" in text or "<" in text or "\x1b" in text or ("\\" in text and _ESCAPE_START.search(text)):
        return _with_markup(text)
    return _plain(text)


def rendered(text: str) -> list[Normalized]:
    """`text` normalized as shown: every tag as nothing, also one whose attributes hold a
    digit or an `@` (which `normalize` reads as written), and strings joined in code as one
    (`"sk-proj-abc" + "def…"`); nothing when it holds neither. A card in table cells
    (`<td width=40>4111</td><td width=40>1111</td>…`) or split by `<span id=1>`, and a key
    put together from two strings, are shown whole. A long text: the stretches around those
    (`SHOWN_REACH` either side), each mapped to its place in `text`, not all of it again."""
    if "<" not in text and "+" not in text:  # (nearly every string: no list built)
        return []
    found = [m.span() for pattern, mark in ((_TAG_HOLDING, "<"), (_JOIN_RE, "+")) if mark in text
             for m in pattern.finditer(text)]
    if not found:
        return []
    if len(text) <= 4 * SHOWN_REACH:
        return [_with_markup(text, _SHOWN)]
    stretches: list[list[int]] = []
    for start, end in sorted(found):
        start, end = max(0, start - SHOWN_REACH), min(len(text), end + SHOWN_REACH)
        before, after = text.rfind(" ", max(0, start - 64), start), text.find(" ", end, end + 64)
        start, end = start if before == -1 else before + 1, end if after == -1 else after  # (whole words)
        if stretches and start <= stretches[-1][1]:
            stretches[-1][1] = max(stretches[-1][1], end)
        else:
            stretches.append([start, end])
    return [_shifted(_with_markup(text[a:b], _SHOWN), a, len(text)) for a, b in stretches]


SHOWN_REACH = 512  # (a value and its markup: a card over four table cells, a key over a few joins)


def tags_holding(text: str) -> list[tuple[int, int]]:
    """The spans of the whole tags in `text` whose attributes hold a digit or an `@`: those
    `normalize` reads as written."""
    if "<" not in text:
        return []
    return [m.span() for m in _WHOLE_TAG.finditer(text) if _HOLDS.search(m.group())]


def tags_shown(text: str) -> Normalized:
    """`text` normalized with every tag as nothing, also one whose attributes hold a digit or
    an `@`: how a stream reads text with such tags, each of which it reads apart as written
    (`StreamRedactor`), where a whole text is read both ways (`rendered`)."""
    return _with_markup(text, _TAGS_SHOWN)


def json_rendered(text: str) -> list[Normalized]:
    """`rendered` for each string of a JSON text (tool-call arguments, a message that is JSON),
    mapped to its place in `text`."""
    if "<" not in text and "+" not in text:
        return []
    return [_shifted(shown, m.start(1) + 1, len(text)) for m in _JSON_TOKEN.finditer(text)
            if m.group(1) is not None for shown in rendered(m.group(1)[1:-1])]


def _shifted(nz: Normalized, at: int, source_len: int) -> Normalized:
    """`nz` (of `text[at:…]`) mapped to offsets in `text` (an empty stretch at 0 moves them)."""
    spans = ((0, 0, at, at), *((ns, ne, os_ + at, oe + at) for ns, ne, os_, oe in nz._spans))
    return Normalized(nz.text, source_len, tuple(sp[0] for sp in spans), tuple(sp[2] for sp in spans), spans)


def _with_markup(text: str, pattern: re.Pattern[str] = _MARKUP) -> Normalized:
    """`text` normalized as its renderer shows it (`_MARKUP`), then as any text: a reference
    or an escape read as its character, markup as nothing (runs of four or more references were read as
    an encoded run already, `detectors.ENCODED_PATTERN`; one digit so written, or a tag
    between groups, hid the value). An unknown named reference stays as it is."""
    table = tables().translate
    parts: list[str] = []
    spans: list[tuple[int, int, int, int]] = []
    n = pos = 0
    for m in pattern.finditer(text):
        number, hexa, name, markup, high, low, *escaped = m.groups()
        if name is not None:
            ch = html5.get(name) if name not in _WRITTEN_OUT else None
            if ch is None:
                continue
        elif markup is not None:
            ch = ""
        elif high is not None:
            ch = chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
        else:
            code = int(number) if number is not None else int(hexa or next(e for e in escaped if e), 16)
            ch = chr(code) if 0 < code < 0x110000 and not 0xD800 <= code <= 0xDFFF else "\ufffd"
        seg = _plain(text[pos:m.start()])
        parts.append(seg.text)
        spans += [(ns + n, ne + n, os_ + pos, oe + pos) for ns, ne, os_, oe in seg._spans]
        n += len(seg.text)
        rep = "".join(table.get(ord(c), c) or "" for c in ch)
        spans.append((n, n + len(rep), m.start(), m.end()))
        parts.append(rep)
        n += len(rep)
        pos = m.end()
    seg = _plain(text[pos:])
    if pos == 0:  # (nothing rendered differently: the common case of an `&` or `<` in text)
        return seg
    parts.append(seg.text)
    spans += [(ns + n, ne + n, os_ + pos, oe + pos) for ns, ne, os_, oe in seg._spans]
    return Normalized("".join(parts), len(text), tuple(sp[0] for sp in spans), tuple(sp[2] for sp in spans),
                      tuple(spans))


def _plain(text: str) -> Normalized:
    if text.isascii():
        if _ASCII_BLANKS.search(text) is None:
            return Normalized(text, len(text))
        return Normalized(text.translate(_ASCII_TABLE), len(text))
    t = tables()
    norm = text.translate(t.translate)
    if len(norm) == len(text) and t.resize.search(text) is None:
        return Normalized(norm, len(text))
    spans: list[tuple[int, int, int, int]] = []
    shift = 0  # normalized offset - original offset so far
    table = t.translate
    for m in t.resize.finditer(text):
        o = m.start()
        rep = table[ord(text[o])] or ""
        ns = o + shift
        spans.append((ns, ns + len(rep), o, o + 1))
        shift += len(rep) - 1
    # Deleted characters give empty spans; consecutive ones keep distinct original ends.
    return Normalized(norm, len(text), tuple(s[0] for s in spans), tuple(s[2] for s in spans), tuple(spans))


# -- JSON inside a string (tool-call arguments) ---------------------------------------------

_ESCAPE = re.compile(r'\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})|u([0-9a-fA-F]{4})|(.))')
# An escape, or a character outside ASCII (a string's raw text, normalized as any text is).
_ESCAPE_OR_WIDE = re.compile(_ESCAPE.pattern + "|([^\x00-\x7f])")
_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescaped(content: str, base: int, n: int, spans: list[tuple[int, int, int, int]]) -> str:
    """A JSON string's content (starting at `base` in the text, at `n` in the normalized
    text) with its escapes decoded and normalized (`\\u0034` is a `4` to any parser, and to a
    model: a card written so in tool-call arguments went out), one span per escape, and its
    other characters outside ASCII normalized as in any text (a span each that changes length)."""
    table = tables().translate
    parts: list[str] = []
    pos = 0
    for m in _ESCAPE_OR_WIDE.finditer(content):
        start = m.start()
        parts.append(content[pos:start])
        n += start - pos
        high, low, code, simple, wide = m.groups()
        if wide is not None:
            rep = table.get(ord(wide), wide) or ""
            if len(rep) != 1:
                spans.append((n, n + len(rep), base + start, base + m.end()))
            parts.append(rep)
            n += len(rep)
            pos = m.end()
            continue
        if high is not None:
            ch = chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
        elif code is not None:
            ch = chr(int(code, 16))
            ch = "\ufffd" if 0xD800 <= ord(ch) <= 0xDFFF else ch
        else:
            ch = _SIMPLE.get(simple, simple)
        rep = table.get(ord(ch), ch) or ""
        spans.append((n, n + len(rep), base + start, base + m.end()))
        parts.append(rep)
        n += len(rep)
        pos = m.end()
    parts.append(content[pos:])
    return "".join(parts)


_STRING_REST = re.compile(r'(?:[^"\\]|\\.)*', re.S)  # a JSON string's content up to its closing quote
# A number token outside strings written with an exponent (`4.111111111111111e15`).
_EXPONENT_TOKEN = re.compile(r'(?<![^\s{}\[\]:,])[-+0-9.]+[eE][-+]?[0-9]+(?![^\s{}\[\]:,"])')
_NUMBER_TAIL = "-+0123456789.eE"


def normalize_json_piece(text: str, in_string: bool, quotes: list[int] | None = None) -> tuple[Normalized, bool, int]:
    """A piece of JSON text streamed in pieces (tool-call arguments), read as its parser reads
    it, its syntax kept: string escapes decoded (`\\n` is a line break, `\\u0040` an `@`) and
    normalized, where the pieces of a stream cannot be parsed one by one (the caller keeps an
    escape cut at the end of a piece for the next one: `escape_cut`); markup in a string read
    as shown (`tags_shown`; the stream reads a tag that holds a digit or an `@` apart, as
    written, and keeps markup cut at a piece's end for the next); and a number outside
    strings written with an exponent that is an integer of nine digits or more as its digits (as `normalize_json` reads a whole one:
    `4.111111111111111e15` is 4111111111111111 to the tool). `in_string`: the piece begins
    inside a string. Returns the normalized piece, whether it ends inside a string, and where
    a number that may go on in the next piece begins (len(text) if none): the caller keeps it
    for the next piece, since a number is converted only whole. `quotes` (if given) gets the
    offsets of the quotes that open and close strings, for `json_placeholder`."""
    spans: list[tuple[int, int, int, int]] = []
    out: list[str] = []
    n = pos = 0
    while pos < len(text):
        if in_string:
            end = _STRING_REST.match(text, pos).end()  # type: ignore[union-attr]
            content = text[pos:end]
            content = _string_text(content, pos, n, spans, _TAGS_SHOWN)
            if end < len(text) and text[end] == '"':  # its closing quote
                if quotes is not None:
                    quotes.append(end)
                content += '"'
                end += 1
                in_string = False
            elif end < len(text):  # a backslash the stream never finished (at its end): as it is
                content += text[end:]
                end = len(text)
        else:
            quote = text.find('"', pos)
            end = len(text) if quote < 0 else quote + 1
            in_string = quote >= 0
            if in_string and quotes is not None:
                quotes.append(quote)
            content = _with_exponents(text, pos, end, n, spans)
        out.append(content)
        n += len(content)
        pos = end
    tail = len(text)
    if not in_string:
        tail = len(text.rstrip(_NUMBER_TAIL))
        # (an array of numbers still open at the end is read whole too: `[4, 1, 1` + `, 1, …]`)
        unfinished = _OPEN_ARRAY.search(text, max(text.rfind('"') + 1, len(text) - _OPEN_ARRAY_HOLD))
        if unfinished is not None:
            tail = min(tail, unfinished.start())
    return (Normalized("".join(out), len(text), tuple(sp[0] for sp in spans), tuple(sp[2] for sp in spans),
                       tuple(spans)), in_string, tail)


def _with_exponents(text: str, pos: int, end: int, n: int, spans: list[tuple[int, int, int, int]]) -> str:
    """text[pos:end], outside strings (at `n` in the normalized text), normalized, each array
    that spells a number (`digit_array`) as its digits, and each number written with an
    exponent that is a long integer as its digits (a span each)."""
    parts: list[str] = []
    at = pos
    for m in _DIGIT_ARRAY.finditer(text, pos, end):
        digits = digit_array(_DIGIT_RUN.findall(m.group(1)))
        if digits is None:
            continue
        parts.append(_exponents(text, at, m.start(1), n, spans))
        n += len(parts[-1])
        spans.append((n, n + len(digits), m.start(1), m.end(1)))
        parts.append(digits)
        n += len(digits)
        at = m.end(1)
    parts.append(_exponents(text, at, end, n, spans))
    return "".join(parts)


def _exponents(text: str, pos: int, end: int, n: int, spans: list[tuple[int, int, int, int]]) -> str:
    parts: list[str] = []
    at = pos
    for m in _EXPONENT_TOKEN.finditer(text, pos, end):
        digits = _exponent_integer(m.group())
        if digits is None:
            continue
        parts.append(_unescaped(text[at:m.start()], at, n, spans))
        n += len(parts[-1])
        spans.append((n, n + len(digits), m.start(), m.end()))
        parts.append(digits)
        n += len(digits)
        at = m.end()
    parts.append(_unescaped(text[at:end], at, n, spans))
    return "".join(parts)


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)


def json_quotes(text: str) -> list[int] | None:
    """The offsets of the quotes that open and close the strings of `text` when it is JSON (as
    `normalize_json` reads it: a redaction there must leave it JSON), else None."""
    bare = text.strip(" \t\r\n")
    if bare[:1] not in ("{", "[") or bare[-1:] not in ("}", "]") or len(text) > MAX_JSON_TEXT:
        return None
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    return [q for m in _JSON_STRING.finditer(text) for q in (m.start(), m.end() - 1)]


def in_json_string(quotes: list[int], at: int) -> bool:
    """Whether what is at offset `at` of JSON text is inside a string (its closing quote
    included), given the offsets of its strings' quotes up to there (`json_quotes`)."""
    return bisect_left(quotes, at) % 2 == 1


def json_placeholder(text: str, start: int, end: int, lo: int, quotes: list[int], placeholder: str,
                     shift: int = 0) -> tuple[int, int, str]:
    """The span of JSON `text` a placeholder replaces, and the placeholder, such that the text
    stays JSON: a value outside a string (a card as a number) is replaced by a string, the
    whole number with its sign (`-4111…` or `4111….5`; the sign only from `lo` on: what went
    out before stays), and a span that begins or ends outside a string (over a string's quote)
    is closed with a quote there. Inside a string the placeholder is as it is (until
    2026-12-05 `{"a": 4111111111111111}` became `{"a": [CREDIT_CARD_1]}`, which no client's
    JSON parser reads). `shift`: the offset of text[0] in the offsets of `quotes`."""
    if not in_json_string(quotes, start + shift):
        if start > lo and text[start - 1] == "-":
            start -= 1
        placeholder = '"' + placeholder
    if not in_json_string(quotes, end + shift):
        while end < len(text) and text[end] in _NUMBER_TAIL:
            end += 1
        placeholder += '"'
    return start, end, placeholder


_CUT_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*(\\(?:u[0-9a-fA-F]{0,3})?)$")


def escape_cut(text: str) -> int:
    """Where an escape cut off at the end of `text` begins (`\\`, `\\u00`), else len(text)."""
    m = _CUT_ESCAPE.search(text[-6:]) if "\\" in text[-6:] else None
    if m is None:
        return len(text)
    # (within the last six characters the run of backslashes before it may have begun earlier)
    head = len(text) - 6 if len(text) > 6 else 0
    run = m.start(1) + head
    backslashes = 0
    while run - backslashes - 1 >= 0 and text[run - backslashes - 1] == "\\":
        backslashes += 1
    return len(text) if backslashes % 2 else m.start(1) + head


_JSON_TOKEN = re.compile(r'("(?:[^"\\\n]|\\.)*")|([{}\[\]:,\s]+)|([^"{}\[\]:,\s]+|")')
MAX_JSON_TEXT = 1 << 20

# A number sent as a JSON array of its digits or groups (`[4,1,1,1,…]`, `[4111, 1111, 1111,
# 1111]`, `[4, 111, 111, 111, 111, 111]`, `[123, 45, 6789]`): read as the one number it spells.
# Only these layouts of non-negative integers: single digits, a printed card's groups, an SSN's,
# thousands; 9 to 19 digits in all (an SSN to the longest card). Other arrays of numbers
# (sizes, scores, colours) are numbers each: their digits joined would pass IIN and Luhn now
# and then.
_ARRAY_LAYOUTS = frozenset({(4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (3, 2, 4)})
_DIGIT_ARRAY = re.compile(r"\[[ \t\r\n]*+([0-9]{1,6}(?:[ \t\r\n]*+,[ \t\r\n]*+[0-9]{1,6}){1,18})[ \t\r\n]*+\]")
_DIGIT_RUN = re.compile(r"[0-9]+")
_OPEN_ARRAY = re.compile(r"\[[ \t\r\n0-9,]*$")
_OPEN_ARRAY_HOLD = 1024  # (19 numbers, pretty-printed, fit; a longer run spells no number)


def digit_array(groups: list[str]) -> str | None:
    """The number an array of non-negative integers (as their decimal digits) spells, when it
    is laid out as one (`_ARRAY_LAYOUTS`, single digits, thousands), else None."""
    if not 2 <= len(groups) <= 19:
        return None
    widths = tuple(map(len, groups))
    digits = "".join(groups)
    if not 9 <= len(digits) <= 19:
        return None
    if widths in _ARRAY_LAYOUTS or all(w == 1 for w in widths) or \
            (widths[0] <= 3 and all(w == 3 for w in widths[1:])):
        return digits
    return None


def normalize_json(text: str) -> Normalized | None:
    """A string holding JSON (tool-call `arguments`), seen as its values: quotes dropped, each
    run of syntax between values (`", "`, `": "`, `{`) one U+001E. Numeric detectors bridge the
    boundary between strings (U+001F) and then the keys that open the next string (words each
    followed by U+001E or U+001F), so a number split over the arguments of two tool calls is
    one value, while two values inside one string are never joined. A number written with
    an exponent that is an integer of nine digits or more (`4.111111111111111e15`, which a
    parser reads as 4111111111111111) is read as that integer's digits, and an array that spells
    one number (`digit_array`: `[4111, 1111, 1111, 1111]`) as its digits. Valid JSON only (else
    None: the caller normalizes the string as text); text outside ASCII in it is normalized
    as any text (until 2026-12-05 such JSON was read as text, its escapes undecoded: one `é`
    anywhere let `jane\\u0040example.com` through)."""
    if len(text) > MAX_JSON_TEXT:
        return None
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return None  # JSON-like text (code, a PEM in braces): scanned as text
    out: list[str] = []
    spans: list[tuple[int, int, int, int]] = []
    n = 0  # normalized length so far
    pos = 0
    while pos < len(text):
        m = _JSON_TOKEN.match(text, pos)
        o, oe = m.start(), m.end()  # type: ignore[union-attr]
        pos = oe
        if m.group(1) is not None:  # a string: its content, without the quotes
            spans.append((n, n, o, o + 1))
            content = _string_text(text[o + 1:oe - 1], o + 1, n, spans)
            out.append(content)
            n += len(content)
            spans.append((n, n, oe - 1, oe))
        elif m.group(2) is not None:  # syntax between values: one boundary (none at the edges)
            rep = "" if o == 0 or oe == len(text) else "\x1e"
            out.append(rep)
            spans.append((n, n + len(rep), o, oe))
            n += len(rep)
            bracket = m.group().rfind("[")  # type: ignore[union-attr]
            if bracket >= 0 and (array := _DIGIT_ARRAY.match(text, o + bracket)) is not None and \
                    (digits := digit_array(_DIGIT_RUN.findall(array.group(1)))) is not None:
                # (one span from its first digit to its last: a finding is the whole array)
                spans.append((n, n + len(digits), array.start(1), array.end(1)))
                out.append(digits)
                n += len(digits)
                pos = array.end(1)
        else:  # numbers, literals: as they are; an integer written with an exponent, as its digits
            token = m.group()  # type: ignore[union-attr]
            digits = _exponent_integer(token) if "e" in token or "E" in token else None
            if digits is None:
                out.append(token)
                n += oe - o
            else:
                spans.append((n, n + len(digits), o, oe))
                out.append(digits)
                n += len(digits)
    return Normalized("".join(out), len(text), tuple(sp[0] for sp in spans), tuple(sp[2] for sp in spans),
                      tuple(spans))


def _string_text(content: str, base: int, n: int, spans: list[tuple[int, int, int, int]],
                 pattern: re.Pattern[str] = _MARKUP) -> str:
    """A JSON string's content (at `base` in the text, at `n` in the normalized text) as the
    JSON parser, and then a model, reads it: escapes decoded, and markup, references and the
    escapes it holds read as `pattern` shows them (`_shown_string`); its spans to `spans`."""
    if "<" in content or "&" in content or "\\\\" in content:
        shown = _shown_string(content, pattern)
        spans.extend((n + ns, n + ne, base + os_, base + oe_) for ns, ne, os_, oe_ in shown._spans)
        return shown.text
    if "\\" in content or not content.isascii():
        return _unescaped(content, base, n, spans)
    return content


def parsed_string(content: str) -> Normalized:
    """A JSON string's content (without its quotes) as its parser reads it, escapes decoded
    (normalized as `_unescaped` does), with the way back to the escapes."""
    spans: list[tuple[int, int, int, int]] = []
    parsed = _unescaped(content, 0, 0, spans) if "\\" in content or not content.isascii() else content
    return Normalized(parsed, len(content), tuple(sp[0] for sp in spans), tuple(sp[2] for sp in spans), tuple(spans))


def _shown_string(content: str, pattern: re.Pattern[str] = _MARKUP) -> Normalized:
    """A JSON string's content as parsed, then as any text is read: markup, references and
    the escapes it holds (`\\u0040` parses as `\u0040`, which a model reads as `@`). A model
    reads `4111<b></b>1111…` as a card whatever wraps it: until 2026-12-06, text sent as a
    JSON object went out with them unread. The way back composes both steps' spans."""
    back = parsed_string(content)
    parsed, parsed_spans = back.text, back._spans
    shown = _with_markup(parsed, pattern)
    if not parsed_spans:
        return shown
    spans = [(ns, ne, back.start(ps), back.end(pe) if pe > ps else back.start(ps)) for ns, ne, ps, pe in shown._spans]
    # A parse span (an escape) outside every markup span, placed by the markup step's offsets.
    marks, k = shown._spans, 0
    for ps, pe, os_, oe in parsed_spans:
        while k < len(marks) and marks[k][3] <= ps:
            k += 1
        if k < len(marks) and marks[k][2] < pe:
            continue  # (inside markup: its span covers it)
        ne_, pe_ = (marks[k - 1][1], marks[k - 1][3]) if k else (0, 0)
        spans.append((ne_ + ps - pe_, ne_ + pe - pe_, os_, oe))
    spans.sort()
    return Normalized(shown.text, len(content), tuple(sp[0] for sp in spans), tuple(sp[2] for sp in spans),
                      tuple(spans))


def _exponent_integer(token: str) -> str | None:
    """The digits of a JSON number written with an exponent when it is an integer of nine to
    21 digits (as `scanner.keyed_text` reads a body's numbers), else None."""
    try:
        value = Decimal(token)
    except InvalidOperation:
        return None
    # (the magnitude from the exponent first: `1e999999999` is a valid JSON number)
    if not (value.is_finite() and 8 <= value.adjusted() <= 20) or value != value.to_integral_value():
        return None
    return str(int(value))
