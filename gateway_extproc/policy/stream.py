"""Redaction of a streamed response, delta by delta (e.g. `delta.content` of SSE chunks).

`StreamRedactor.feed(delta)` returns the text that is safe to emit now and holds back at
most `holdback_chars` trailing characters, so a value split across chunks is still seen
whole. It runs the scanner's own procedure (same regex, same overlap rules) over the held
text plus the new delta, and finalizes only candidates that start at least `holdback_chars`
before the end of what has arrived. Hence, when every finding is shorter than the hold-back
window (minus two characters of look-ahead), or has no space and is shorter than
MAX_WORD_HOLD (the last word is held back whole, and so is a separated number: `_number_run`),
the concatenated output equals
`redact(text, scanner.decide(scanner.scan(text)).redact)` for the whole text.

Longer secrets (sk-proj keys, JWTs, PEM blocks) still never leak: their detectors match a
value cut off by the end of the available text, and a redacted finding that reaches the end
stays *open*: later deltas that continue it are swallowed into the same placeholder. A word
longer than MAX_WORD_HOLD goes out in checked steps (`_long_word`): a value encoded anywhere
in it is found, and the rest of the word becomes its placeholder.

Deltas are normalized like request strings (see `normalize`: NFKC, format characters
removed, digits to ASCII) before the scan, delta by delta (the mapping is per character, so
a split never changes it); what is emitted is the provider's original text, and a
placeholder replaces the original characters of a value. Findings and placeholder values
are in original characters.

A blocking finding (per `DecisionParams`) stops the stream: `blocked` becomes True, the
decision is in `block_decision`, and `feed`/`flush` return "" from then on (the caller ends
the stream with an error). Per-delta cost is O(len(delta) + holdback); inside a word longer
than MAX_WORD_HOLD, four scans of about MAX_WORD_HOLD characters per LONG_STEP released.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right

from .detectors import (CARD_GOING_ON, CELL_SEP, DIGIT_WORD, KEY_ENDING, KEY_HEAD_ENDING, LOCAL_CHARS,
                        MAX_WORDED_CARD, SEP_CHARS, SPACES, WORD_GAP, hex_dump_start, number_words_start)
from .normalize import (
    Normalized,
    escape_cut,
    json_placeholder,
    normalize,
    normalize_json_piece,
    parsed_string,
    tags_holding,
    tags_shown,
)
from .scanner import (
    Decision,
    DecisionParams,
    Finding,
    PlaceholderMap,
    Scanner,
    _as_map,
    _label,
)

GUARD_MARGIN = 2  # characters of look-ahead a detector's end guard may need
CONTEXT = 64  # already-emitted characters kept for look-behinds (context words: 48)
MAX_OPEN = 64 * 1024  # an open (still growing) redacted value is closed beyond this
MAX_NUMBER_HOLD = 64 * 1024  # (json) a number at a delta's end is read with the next delta up to this long


# A value without spaces (an e-mail, a key, an encoded run) may be longer than the hold-back:
# the last word of what has arrived is held back whole, up to this many characters.
MAX_WORD_HOLD = 1024
# A word longer than that goes out in steps of at least this many characters, each checked
# with the MAX_WORD_HOLD characters after it (`_long_word`).
LONG_STEP = 1024
_SPACE = re.compile("[ \n\t\r]")
# (json) A quote ends a word too: compact JSON has no space, and its values are in strings.
_JSON_SPACE = re.compile('[ \n\t\r"]')
_RUN_END = re.compile("\\S\\S|[\n\t\r]| {4}")
_NUMBER_CHARS = frozenset("0123456789 ")  # a number, spelled out or not, a long word may cut


# An '@' or a written-out one (`(at)`, `[at]`, `"at"`, HTML's `&#64;`) with up to 16 spaces
# around: the address it may belong to can be longer than the hold-back (`jane.doe   (at)
# payments-eu-west-department [dot] example [dot] com`), so what may be its local part is held
# back while the sign is among the last EMAIL_HOLD characters. A bare ` at ` (or ` arroba `)
# is everyday English: what may be the local part before it is held only while what follows
# it to the end still reads as a domain being written (`example dot co`, `example.`, `ex`;
# not `noon, we`): until 2026-12-07 an address written so went out when it was longer than
# the hold-back (`jane.doe.research.emea.contractors.ops at example dot com`, in small pieces).
_PENDING_AT = re.compile(r"@|[(\[{<\"']\s{0,16}(?:[Aa][Tt]|@)\s{0,16}[)\]}>\"']|&#0{0,4}64;|&#[xX]0{0,4}40;|&commat;")
_BARE_AT = re.compile(r"\s(?:at|arroba)\s", re.I)
_DOMAIN_GOING_ON = re.compile(
    r"\s{0,15}[A-Za-z0-9\-]{0,63}(?:(?:\s{1,16}(?:dot|punto|period)\s{1,16}|\s{0,16}\.\s{0,16})[A-Za-z0-9\-]{0,63}){0,9}"
    r"(?:\s{1,16}(?:d(?:ot?)?|p(?:u(?:n(?:to?)?)?|e(?:r(?:i(?:od?)?)?)?)?))?\s{0,16}", re.I)
EMAIL_HOLD = 260  # (the prefilter's reach after an '@')


# The start of what `normalize` reads as rendered markup (`normalize._MARKUP`), cut off at
# the end of a delta: a character reference (`&`, `&#5`, `&nbs`), a tag or comment not yet
# closed (`<`, `</b`, `<span class="x"`, `<!-- …`), an ANSI escape sequence (`\x1b[0`), a
# backslash escape (`\u00`).
_PARTIAL_MARKUP = re.compile(r"&(?:#(?:[0-9]{0,7}|[xX][0-9A-Fa-f]{0,6})|[A-Za-z][A-Za-z0-9]{0,31})?$"
                             r"|<(?:!(?:-(?:-.{0,200})?)?|/?(?:[A-Za-z][A-Za-z0-9-]{0,15}(?:\s[^<>]{0,200})?/?)?)?$"
                             r"|\x1b(?:\[[0-9;?]{0,16}[ -/]{0,2})?$"
                             r"|\\(?:u[0-9A-Fa-f]{0,3}|x[0-9A-Fa-f]?|U[0-9A-Fa-f]{0,7})?$"
                             # (a surrogate pair's first half: the second may follow in the next delta)
                             r"|\\u[dD][89abAB][0-9a-fA-F]{2}(?:\\(?:u[0-9A-Fa-f]{0,3})?)?$", re.S)
_MARKUP_HOLD = 240  # (the longest partial markup above)


def _markup_cut(text: str) -> int:
    """Where markup that may go on in the next delta begins, else len(text)."""
    tail = max(0, len(text) - _MARKUP_HOLD)
    end = text[tail:]
    if "&" not in end and "<" not in end and "\x1b" not in end and "\\" not in end:
        return len(text)
    m = _PARTIAL_MARKUP.search(text, tail)
    return len(text) if m is None else m.start()


def _pending_address(buf: str, base: int) -> int | None:
    """Where the local part before the first '@' among the last EMAIL_HOLD characters of
    `buf` (at `base`) begins, as the position of its boundary character, if there is one."""
    lo = max(0, len(buf) - EMAIL_HOLD)
    m = _PENDING_AT.search(buf, lo)
    if m is None:
        m = _pending_bare_at(buf, lo)
        if m is None:
            return None
    i = m.start()
    stop = max(0, i - 16)
    while i > stop and buf[i - 1].isspace():
        i -= 1
    stop = max(0, i - 64)
    while i > stop and buf[i - 1] in LOCAL_CHARS:
        i -= 1
    return base + max(0, i - 1)


def _pending_bare_at(buf: str, lo: int) -> re.Match[str] | None:
    """The last bare ` at ` among buf[lo:] that what follows it to the end may still make an
    address of (`_DOMAIN_GOING_ON`)."""
    last = None
    for m in _BARE_AT.finditer(buf, lo):
        last = m
    if last is None or _DOMAIN_GOING_ON.fullmatch(buf, last.end()) is None:
        return None
    return last


def _pending_key(buf: str, base: int) -> int | None:
    """Where an sk- key (or its head) whose pattern reads on to the end of `buf` (at `base`)
    begins, as the position of its boundary character, among the last MAX_WORD_HOLD
    characters: in pieces, or cut after `s`, it is several words, and its check may take it
    only once more has arrived (its head's rest, the pieces holding its digits)."""
    if (m := KEY_HEAD_ENDING.search(buf, max(0, len(buf) - 8))) is not None:
        return base + max(0, m.start() - 1)
    lo = max(0, len(buf) - MAX_WORD_HOLD)
    for k in _KEY_HEAD_K.finditer(buf, lo):  # (KEY_ENDING's `k`, then the `s` before it: cheaper)
        for at in range(max(lo, k.start() - 4), k.start()):
            if buf[at] == "s" and KEY_ENDING.match(buf, at):
                return base + max(0, at - 1)
    return None


_KEY_HEAD_K = re.compile(r"k[ \t\r\n]{0,3}-")
_NUMBER_RUN_CHARS = "0123456789" + SEP_CHARS
_DIGIT_WORD_END = re.compile(rf"(?<![A-Za-z]){DIGIT_WORD}$")
# (an IBAN's groups of capitals and digits too, `…/GB82 WEST 1234 …`, and groups after letters
# between them, `…/4111 x 1111 x …`)
_CELL = r"(?:[0-9]+|[A-Z0-9]{1,4}(?![A-Za-z0-9]))"
_CELLS_ON = re.compile(rf"(?:{CELL_SEP}(?:{DIGIT_WORD}(?![A-Za-z])|{_CELL})|{WORD_GAP}{_CELL})+")
# (what has arrived may be a digit word's start, or such words': `4111 x `, `4111 (then) `)
_WORD_GOING_ON = re.compile(r"[\s,\-]*(?:[(\[{/]?[A-Za-z]*[)\]}/]?[ \t\r\n\-]*){0,2}")


def _number_run(buf: str, base: int) -> tuple[int, bool] | None:
    """Where the separated number ending `buf` (at `base`) begins, as the position of its
    boundary character, at most MAX_WORD_HOLD back, and whether it is longer than that. A
    card in a printed layout anywhere in a longer number makes the whole number a finding
    (`detectors._card_run`: `ref 123… 4111 1111 1111 1111`), and a card after digits already
    emitted is read as their tail: so the number is held whole, as a word is, and a longer
    one goes out in checked steps (`_long_word`)."""
    run = len(buf) - len(buf.rstrip(_NUMBER_RUN_CHARS))
    if not run:
        return None
    start = len(buf) - len(buf[-run:].lstrip(SEP_CHARS))
    if start == len(buf):
        return None
    lo = max(len(buf) - MAX_WORD_HOLD, 0)
    return base + max(start - 1, lo), start - 1 < lo


def _worded_card(buf: str, base: int) -> int | None:
    """Where a card with words between its groups (`detectors.CARD_GOING_ON`) that is still
    arriving at the end of `buf` (at `base`) begins, as the position of its boundary character:
    with long gaps it is longer than the hold-back, and its first groups, released before its
    last arrived, would go out in clear (until 2026-12-07)."""
    m = CARD_GOING_ON.search(buf, max(0, len(buf) - MAX_WORDED_CARD))
    return None if m is None else base + max(0, m.start() - 1)


def _number_from(buf: str, at: int) -> tuple[str, bool]:
    """The digits and separators from `buf[at]` on, and whether they reach the end of `buf`
    (the number may go on)."""
    rest = buf[at:]
    number = rest[:len(rest) - len(rest.lstrip(_NUMBER_RUN_CHARS))]
    return number, len(number) == len(rest)


def _last_word(buf: str, base: int, json: bool = False) -> tuple[int, bool]:
    """Where the last run of non-space characters of `buf` (at `base`) begins, as the position
    of its boundary character, at most MAX_WORD_HOLD back: no scan may decide on it yet; and
    whether the word is longer than that (it began before). A spelled-out run (`j a n e @ e
    x …`, `detectors.SPACED_PATTERN`) or a number read out in words (`four one one …`)
    ending `buf` is one word. `json`: a quote ends a word (`_JSON_SPACE`)."""
    lo = max(0, len(buf) - MAX_WORD_HOLD)
    space = _word_break(buf, lo, len(buf), json)
    while space > lo + 1 and buf[space] == "\n" and buf[space - 1 - (buf[space - 1] == "\r")] == "=":
        space = _word_break(buf, lo, space - 1, json)  # a quoted-printable soft line break: one word
    if space < 0:
        return base + lo, True
    at = space
    while at > lo and buf[at] == " ":  # before it: one to three spaces after a single character?
        cell = at - 1
        while cell > lo and at - cell < 3 and buf[cell] == " ":
            cell -= 1
        if cell <= lo:
            if lo and at < space:  # cells went by: a spelled-out run longer than the hold
                return base + lo, True
            break
        if buf[cell].isspace() or not buf[cell - 1].isspace():
            break
        at = cell - 1
    # (Number words longer than the hold are one long number: they hide no value; hex-dump
    # cells before the last word are one run with it, `detectors.HEX_DUMP`.)
    return base + hex_dump_start(buf, number_words_start(buf, at, lo), lo), lo > 0 and at <= lo < space


def _word_break(buf: str, lo: int, hi: int, json: bool) -> int:
    """The last space (or line break, tab; a quote in JSON) in buf[lo:hi], or -1."""
    return max(buf.rfind(" ", lo, hi), buf.rfind("\n", lo, hi), buf.rfind("\t", lo, hi), buf.rfind("\r", lo, hi),
               buf.rfind('"', lo, hi) if json else -1)


class StreamRedactor:
    __slots__ = ("scanner", "params", "holdback", "mapping", "findings", "decisions", "blocked",
                 "block_decision", "_buf", "_base", "_emit", "_resume", "_open", "_inj_hits",
                 "_inj_reported", "_done", "_raw", "_rbase", "_remit", "_segs", "_seg_starts", "_long", "_long_at",
                 "_swallow", "_json", "_pending", "_in_string", "_quotes", "_space")

    def __init__(self, scanner: Scanner, decision_params: DecisionParams | None = None,
                 holdback_chars: int = 64, *, mapping: PlaceholderMap | None = None, json: bool = False) -> None:
        """`json`: the text is JSON streamed in pieces (tool-call arguments), read with its string
        escapes decoded as the tool's parser decodes them, and a number written with an exponent
        as its digits (`normalize_json_piece`): `"4111\\n1111\\n…"`
        is a card written down a column, `jane\\u0040example.com` an address."""
        self.scanner = scanner
        self.params = decision_params or DecisionParams()
        self.holdback = max(0, int(holdback_chars))
        self.mapping = _as_map(mapping)
        self.findings: list[Finding] = []  # every accepted finding, offsets in the whole text
        self.decisions: list[Decision] = []  # one per batch of findings (for logging)
        self.blocked = False
        self.block_decision: Decision | None = None
        # Positions are in the virtual text "\n" + streamed text.
        self._buf = "\n"  # virtual text from _base on
        self._base = 0
        self._emit = 1  # everything before has been returned
        self._resume = 0  # where the scan procedure continues
        self._open: tuple[int, int, int, str, str] | None = None  # (start, end, group, placeholder, label)
        self._inj_hits: list[tuple[int, int, str, int, str]] = []
        self._inj_reported = 0
        self._done = False
        # The original text beside the normalized one: `_raw` from raw offset `_rbase`, and per
        # delta (normalized start, normalized end, raw start, Normalized) to map offsets.
        self._raw = "\n"
        self._rbase = 0
        self._remit = 1  # raw offset of `_emit`
        self._segs: list[tuple[int, int, int, Normalized]] = [(0, 1, 0, normalize("\n"))]
        self._seg_starts: list[int] = [0]
        # Emission is inside a word longer than MAX_WORD_HOLD (`_long_word`): "word" (no
        # spaces) or "run" (spelled out).
        self._long = ""
        self._long_at = 0  # its boundary character (normalized offset)
        self._swallow = False  # ... whose rest a placeholder replaces
        self._json = json
        self._space = _JSON_SPACE if json else _SPACE  # what ends a word
        # An escape or a number (json), or a character reference (text), cut off at the end of
        # the last delta, read with the next; (json) whether it is inside a string.
        self._pending = ""
        self._in_string = False
        # (json) raw offsets of the quotes that open and close strings, from `_rbase` on (a -1
        # first keeps the parity of those trimmed off): a placeholder outside a string is
        # quoted (`json_placeholder`).
        self._quotes: list[int] = []

    def feed(self, delta: str) -> str:
        if self._done:
            raise RuntimeError("feed() after flush()")
        return self._take(delta, final=False)

    def _take(self, delta: str, final: bool) -> str:
        if self.blocked or not delta:
            return ""
        if self._json:
            delta = self._pending + delta
            # Markup cut off at the end waits too (valid JSON has markup only inside strings).
            cut = len(delta) if final else _markup_cut(delta[:escape_cut(delta)])
            head = delta[:cut]
            if tags := tags_holding(head):
                head = self._tags_apart(head, tags)
                if self.blocked:
                    return ""
            delta, cut = head + delta[cut:], len(head)
            quotes: list[int] = []
            nz, in_string, tail = normalize_json_piece(delta[:cut], self._in_string, quotes)
            if not final and tail < cut and cut - tail < MAX_NUMBER_HOLD:
                # A number ends the delta: written with an exponent, it is read as its digits
                # only whole (`4.1111111` + `11111111e15` is a card).
                quotes = []
                nz, in_string, cut = *normalize_json_piece(delta[:tail], self._in_string, quotes)[:2], tail
            delta, self._pending, self._in_string = delta[:cut], delta[cut:], in_string
            if not delta:
                return ""
            r0 = self._rbase + len(self._raw)
            self._quotes += [r0 + q for q in quotes]
        else:
            # Markup cut off at the end (`&#5` + `2;111 …`, `4111<` + `b>1111…`) is read whole,
            # as the client's renderer reads it (`normalize`).
            delta = self._pending + delta
            cut = len(delta) if final else _markup_cut(delta)
            delta, self._pending = delta[:cut], delta[cut:]
            if not delta:
                return ""
            tags = tags_holding(delta)
            if tags:
                delta = self._tags_apart(delta, tags)
                if self.blocked:
                    return ""
            nz = tags_shown(delta) if tags else normalize(delta)
        if nz.text:
            n0 = self._base + len(self._buf)
            self._segs.append((n0, n0 + len(nz.text), self._rbase + len(self._raw), nz))
            self._seg_starts.append(n0)
            self._buf += nz.text
        self._raw += delta
        if not nz.text:
            return ""
        return self._advance(final=False)

    def _tags_apart(self, delta: str, tags: list[tuple[int, int]]) -> str:
        """`delta` with the values inside its tags whose attributes hold a digit or an `@`
        redacted, each tag read apart as written (the model reads `<a 4111 1111 1111 1111>` or
        `<img alt="jane@example.com">`). The text around them is read as shown, each such tag
        as nothing (`tags_shown`): read as written, `<td width=40>4111</td><td width=40>1111…`
        hid a card in table cells (a whole text reads both ways, `normalize.rendered`). A tag
        is whole in one delta: one cut at its end waits for the next (`_markup_cut`). In JSON,
        a tag is read as the tool's parser reads it, escapes decoded (`4111\\n1111\\n…` in an
        attribute is a card down a column)."""
        texts = [parsed_string(delta[a:b]) if self._json else Normalized(delta[a:b], b - a) for a, b in tags]
        # One text for all of them, a line each (no value reads on past a tag's `>`): a delta
        # of thousands of `<a 1>` is one scan, not thousands.
        starts, at = [], 0
        for t in texts:
            starts.append(at)
            at += len(t.text) + 1
        r0 = self._rbase + len(self._raw) - 1  # (offsets in the whole text, as `_original`'s)

        def where(i: int, end: bool) -> int:  # an offset of the joined text, in the whole text
            k = bisect_right(starts, i - end) - 1
            local = i - starts[k]
            return r0 + tags[k][0] + (texts[k].end(local) if end else texts[k].start(local))

        batch = [Finding(f.rule, f.detector, where(f.start, False), where(f.end, True), f.value, f.index, f.score)
                 for f in self.scanner.scan("\n".join(t.text for t in texts))]
        if not batch:
            return delta
        decision = self.scanner.decide(batch, self.params)
        self.decisions.append(decision)
        self.findings.extend(batch)
        if decision.block:
            self._block(decision, self._base + len(self._buf))
            return ""
        out, at = [], 0
        for f in sorted(decision.redact, key=lambda f: f.start):
            start, end = f.start - r0, f.end - r0
            if start < at:  # (overlaps one already replaced)
                continue
            out += (delta[at:start], self.mapping.placeholder(_label(f.detector), f.value))
            at = end
        return "".join(out) + delta[at:]

    def _raw_start(self, n: int) -> int:
        """Raw offset of the character at normalized offset `n` (end of text: raw end)."""
        k = bisect_right(self._seg_starts, n) - 1
        ns, ne, rs, nz = self._segs[k]
        if n >= ne:
            return self._rbase + len(self._raw) if k == len(self._segs) - 1 else self._segs[k + 1][2]
        return rs + nz.start(n - ns)

    def _raw_end(self, n: int) -> int:
        """Raw offset just past the character before normalized offset `n`."""
        k = bisect_right(self._seg_starts, n - 1) - 1
        ns, ne, rs, nz = self._segs[k]
        return rs + nz.end(n - ns)

    def _raw_slice(self, a: int, b: int) -> str:
        return self._raw[a - self._rbase:b - self._rbase]

    def held(self) -> str:
        """The original text fed but not yet returned (the hold-back window's), "" once
        blocked or flushed: what a value split into the next text may have begun with."""
        if self.blocked or self._done:
            return ""
        return self._raw[self._remit - self._rbase:] + self._pending

    @property
    def done(self) -> bool:
        """flush() was called: the next text needs a new redactor."""
        return self._done

    def flush(self) -> str:
        """The rest of the text, at the end of the stream."""
        if self._done:
            return ""
        head = ""
        if self._pending:  # (what the stream never finished: read as it is)
            pending, self._pending = self._pending, ""
            head = self._take(pending, final=True)
        self._done = True
        if self.blocked:
            return ""
        return head + self._advance(final=True)

    # -- internals ---------------------------------------------------------------------

    def _advance(self, final: bool) -> str:
        scanner = self.scanner
        buf, base = self._buf, self._base
        n = base + len(buf)
        if self._open is not None and not self._continue(n, final):
            self._trim()
            return ""
        head = ""
        if self._long:
            head, inside = self._long_word(n, final)
            if inside or self.blocked:
                self._trim()
                return head
        if final or not self.holdback:
            limit = n
        else:
            at, longer = _last_word(buf, base, self._json)
            limit = min(n - self.holdback, at)
            if (address := _pending_address(buf, base)) is not None:
                limit = min(limit, address)
            if (key := _pending_key(buf, base)) is not None:
                limit = min(limit, key)
            number = _number_run(buf, base)
            if number is not None:
                limit = min(limit, number[0])
            if (card := _worded_card(buf, base)) is not None:
                limit = min(limit, card)
            if number is not None and number[1]:  # (the last word, or spelled-out run, is in it)
                self._long, self._long_at = "number", number[0]
            elif longer:  # the scan reads its start with what has arrived; `_long_word` the rest
                self._long = "word" if self._space.search(buf, at - base) is None else "run"
                self._long_at = at
        rel_hits, resume = scanner.hits_between(buf, self._resume - base, limit - base)
        resume += base

        found: list[Finding] = []  # normalized offsets and values
        inj_new: list[tuple[int, int, str, int, str]] = []
        scanner._collect(buf, rel_hits, 0, base - 1, found, inj_new)
        if inj_new:
            self._inj_hits.extend(inj_new)
            keys = {k for *_, k in self._inj_hits}
            extra = scanner._injection_findings(self._inj_hits[self._inj_reported:], keys)
            if extra:
                self._inj_reported = len(self._inj_hits)
                found.extend(extra)
                found.sort(key=lambda f: f.start)

        redact_spans: dict[tuple[int, int], str] = {}
        if found:
            batch = [self._original(f) for f in found]
            span_of = {id(o): (f.start, f.end) for f, o in zip(found, batch)}
            decision = scanner.decide(batch, self.params)
            self.decisions.append(decision)
            self.findings.extend(batch)
            if decision.block:
                self._block(decision, n)
                return ""
            for f in decision.redact:
                redact_spans.setdefault(span_of[id(f)], f.detector)

        out: list[str] = [head]
        emit, remit = self._emit, self._remit
        opened = None
        for s, e, gi in rel_hits:
            detector = redact_spans.get((s + base - 1, e + base - 1))
            if detector is None:
                continue
            rs, re_ = self._raw_start(s + base), self._raw_end(e + base)
            label = _label(detector)
            placeholder = self.mapping.placeholder(label, self._raw_slice(rs, re_))
            value = placeholder
            if self._json:
                rb = self._rbase
                rs, re_, value = json_placeholder(self._raw, rs - rb, re_ - rb, remit - rb, self._quotes,
                                                  placeholder, rb)
                rs, re_ = rs + rb, re_ + rb
            out.append(self._raw_slice(remit, rs))
            out.append(value)
            emit, remit = e + base, re_
            if not final and (emit >= n - GUARD_MARGIN or self._reads_on(s + base, gi, n)):
                opened = (s + base, emit, gi, placeholder, label)
        if opened is not None:
            self._open = opened
            self._emit = self._resume = emit
            self._remit = remit
        else:
            cut = max(resume, emit)
            rcut = max(remit, self._raw_start(cut))
            out.append(self._raw_slice(remit, rcut))
            self._emit, self._remit = cut, rcut
            self._resume = resume
            if self._long:  # emission reached the long word: release what can go now
                out.append(self._long_word(n, final)[0])
        self._trim()
        return "".join(out)

    def _long_word(self, n: int, final: bool) -> tuple[str, bool]:
        """Release a word longer than MAX_WORD_HOLD (emission is at its start or inside it),
        and whether emission is still inside it. Scanned from where emission stopped, it is
        cut mid-run: an encoded run read from there decodes out of step (base64 in groups of
        four characters), a spelled-out run is read from a cell that is not its start, so a
        value after 1 KB of padding went out unseen. Each step is scanned at all four offsets,
        with the MAX_WORD_HOLD characters after it, before it goes out. A finding replaces the
        rest of the word with its placeholder (the whole-text scan would replace the whole
        run; what went out before it was seen clean)."""
        if self._swallow:
            end, complete = self._word_end(self._emit, n, final)
            self._emit = self._resume = end
            self._remit = self._raw_start(end) if end < n else self._rbase + len(self._raw)
            if complete:
                self._swallow, self._long = False, ""
            return "", not complete
        buf, base, emit = self._buf, self._base, self._emit
        start = max(self._long_at + 1, base)
        if emit > start:
            # A redaction (of a value encoded in the whole word) may have taken emission to
            # the word's end or past it: what follows is not the long word.
            end, complete = self._word_end(start, n, final)
            if complete and end <= emit:
                self._long = ""
                return "", False
        lead = ""
        if emit < n and (buf[emit - base] in SPACES or self._json and buf[emit - base] == '"'):
            # the space (json: quote) before the word goes out as it is
            rnext = self._raw_start(emit + 1)
            lead = self._raw_slice(self._remit, rnext)
            emit = self._emit = self._resume = emit + 1
            self._remit = rnext
        end, complete = self._word_end(emit, n, final)
        if complete:  # the rest of the word; what follows it goes through the usual scan
            stop = seen = end
        else:
            stop = n - MAX_WORD_HOLD
            if stop - emit < LONG_STEP:
                return lead, True
            # Not the last characters: a number they cut short may look like a value it is not.
            seen = n - self.holdback
            while seen > stop and buf[seen - 1 - base] in _NUMBER_CHARS:
                seen -= 1
        found = self._word_findings(emit, seen, complete)
        if found:
            decision = self.scanner.decide(found, self.params)
            self.decisions.append(decision)
            self.findings.extend(found)
            if decision.block:
                self._block(decision, n)
                return "", True
            if decision.redact:
                first = decision.redact[0]
                self._swallow = True
                placeholder = self.mapping.placeholder(_label(first.detector), first.value)
                rest, inside = self._long_word(n, final)
                return lead + placeholder + rest, inside
        rstop = self._raw_start(stop) if stop < n else self._rbase + len(self._raw)
        out = lead + self._raw_slice(self._remit, rstop)
        self._emit = self._resume = stop
        self._remit = rstop
        if complete:
            self._long = ""
        return out, not complete

    def _word_end(self, emit: int, n: int, final: bool) -> tuple[int, bool]:
        """Where the long word that emission is in ends (n while it goes on), and whether it
        has ended: a word at the first space; a spelled-out run after the first word written
        whole (its last word, with the separated number it begins), or where a line or four
        spaces break it."""
        buf, base = self._buf, self._base
        if self._long == "number":
            number, going_on = _number_from(buf, emit - base)
            if going_on:
                return n, final
            after = buf[emit - base + len(number)]
            if number[-1:] not in SEP_CHARS and (after.isalpha() or after == "_"):
                self._long = "word"  # digits glued to letters: a word (hex, base64) goes on
            else:
                end = self._cells_after(emit - base + len(number.rstrip(SEP_CHARS)), final)
                return (n, False) if end is None else (base + end, True)
        m = (self._space if self._long == "word" else _RUN_END).search(buf, emit - base)
        if m is None:
            return n, final
        if m.group()[0].isspace() or m.group() == '"':
            word, end = emit - base, m.start()
        else:  # a run's last word: it ends with it
            word = m.start()
            m = self._space.search(buf, word)
            if m is None:
                return n, final
            end = m.start()
        end = self._number_after(word, end, final)
        return (n, False) if end is None else (base + end, True)

    def _number_after(self, word: int, end: int, final: bool) -> int | None:
        """The end of the word at buf[word:end] with the number its end begins, if it ends in
        digits (`…b2s=/4111 1111 1111 1111`, `… d o g 4111 …`, `DE89 3704 …`, `… 8 9. 4111 …`)
        or a digit word (`…/four one one …`), and the digit words and groups after it: released
        with the word, the number's first group would make the rest read as its tail. None: the
        number may go on."""
        buf = self._buf
        last = end
        while last > word and buf[last - 1] in SEP_CHARS:
            last -= 1
        if last > word and buf[last - 1].isdigit():
            number, going_on = _number_from(buf, end)
            if going_on and not final:
                return None
            return self._cells_after(end + len(number.rstrip(SEP_CHARS)), final)
        if _DIGIT_WORD_END.search(buf, max(word, last - 5), last) is not None:
            return self._cells_after(end, final)
        return end

    def _cells_after(self, stop: int, final: bool) -> int | None:
        """Where the digit words and digit groups after a number's end at `stop` end (`…/4111
        one one …`, `…/four one 1111 …`: a number read out partly in words). None: they may
        go on."""
        m = _CELLS_ON.match(self._buf, stop)
        stop = m.end() if m is not None else stop
        if not final and _WORD_GOING_ON.fullmatch(self._buf, stop) is not None:
            return None
        return stop

    def _word_findings(self, start: int, end: int, complete: bool) -> list[Finding]:
        """Findings in buf[start:end] (normalized offsets) read from each of its first four
        characters, in original characters spanning start..end. Digits just before `start`
        are read with it: a number cut in two is not two numbers. Cut anywhere (not
        `complete`), a piece one past a multiple of four loses its last character: no
        base64 is that long."""
        first = start - self._base
        while first > max(0, start - self._base - 64) and self._buf[first - 1] in _NUMBER_CHARS:
            first -= 1
        text = self._buf[first:end - self._base]
        found: dict[tuple[str, str], Finding] = {}
        rs, re_ = self._raw_start(start) - 1, self._raw_end(end) - 1
        for i in range(min(4, len(text))):
            piece = text[i:]
            for f in self.scanner.scan(piece[:-1] if not complete and len(piece) % 4 == 1 else piece):
                found.setdefault((f.rule, f.value), Finding(f.rule, f.detector, rs, re_, f.value, f.index, f.score))
        return list(found.values())

    def _block(self, decision: Decision, n: int) -> None:
        self.blocked = True
        self.block_decision = decision
        self._buf, self._base = "", n
        self._raw, self._rbase = "", self._rbase + len(self._raw)

    def _original(self, f: Finding) -> Finding:
        """A finding at normalized offsets of the virtual text, in original characters."""
        rs, re_ = self._raw_start(f.start + 1), self._raw_end(f.end + 1)
        nval = self._buf[f.start + 1 - self._base:f.end + 1 - self._base]
        value = self._raw_slice(rs, re_) if f.value == nval else f.value
        return Finding(f.rule, f.detector, rs - 1, re_ - 1, value, f.index, f.score)

    def _reads_on(self, start: int, gi: int, n: int) -> bool:
        """Whether the pattern of the value found at `start` reads on to the end of what has
        arrived, though its check ended the value before (a key in pieces whose last pieces
        so far read as words: the next may be more of the key)."""
        region = self.scanner._region_at[gi]
        if region is None or region.kind != "builtin" or region.check is None:
            return False
        m = region.solo.match(self._buf, start - 1 - self._base)
        return m is not None and m.end(m.lastindex or 0) + self._base >= n - GUARD_MARGIN

    def _continue(self, n: int, final: bool) -> bool:
        """Extend the open finding with what arrived; True once it is closed."""
        assert self._open is not None
        start, end, gi, placeholder, label = self._open
        buf, base = self._buf, self._base
        region = self.scanner._region_at[gi]
        m = region.solo.match(buf, start - 1 - base) if region is not None else None
        new_end = end
        if m is not None:
            # Where its check ends it, as a whole text's scan reads it, even short of where it
            # ended so far (what it gives back goes out as text): a key in pieces ends before
            # the words after it, which its pattern takes too.
            # (An encoded, spelled-out or read-out run's check reads what it decodes to: the
            # run goes on as its pattern says.)
            e = m.end(m.lastindex or 0)
            if region.kind == "builtin" and region.check is not None:
                e = region.check(buf, start - base, e)
                new_end = e + base if e else end
            else:
                new_end = max(end, e + base)
        if new_end != end:
            rs, rold, rnew = self._raw_start(start), self._raw_end(end), self._raw_end(new_end)
            old, new = self._raw_slice(rs, rold), self._raw_slice(rs, rnew)
            self.mapping._extend(placeholder, label, old, new)
            for i in range(len(self.findings) - 1, -1, -1):
                f = self.findings[i]
                if f.start == rs - 1 and f.end == rold - 1:
                    self.findings[i] = Finding(f.rule, f.detector, f.start, rnew - 1, new, f.index, f.score)
            self._remit = rnew
        self._emit = self._resume = new_end
        if not final and (new_end >= n - GUARD_MARGIN or self._reads_on(start, gi, n)) and new_end - start < MAX_OPEN:
            self._open = (start, new_end, gi, placeholder, label)
            return False
        self._open = None
        return True

    def _trim(self) -> None:
        keep = min(self._emit, self._resume)
        if self._open is not None:
            keep = min(keep, self._open[0] - 1)
        keep -= CONTEXT
        if keep > self._base:
            rkeep = min(self._raw_start(keep), self._remit)
            self._buf = self._buf[keep - self._base:]
            self._base = keep
            self._raw = self._raw[rkeep - self._rbase:]
            self._rbase = rkeep
            if self._quotes:
                q = bisect_left(self._quotes, rkeep)
                if q:
                    del self._quotes[:q]
                    if q % 2:
                        self._quotes.insert(0, -1)
            k = bisect_right(self._seg_starts, keep) - 1
            if k > 0:
                del self._segs[:k]
                del self._seg_starts[:k]
