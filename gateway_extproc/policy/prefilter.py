"""Where in a text the combined regex has to look: a Hyperscan pass over the whole text.

The scanner's combined regex (Python `re`) tries its alternatives at every token start, which
costs ~0.1-0.2 us per character: 100-200 ms for 1 MB. Hyperscan (PyPI `hyperscan`, the
library is in the wheel) runs every trigger at once in SIMD at ~1 GB/s and reports where
something could match; the regex then runs only in those windows, with exactly the rules,
validators and overlap resolution it has on the whole text. So results never differ from a
full scan (tests/test_prefilter.py compares them), and text with nothing in it costs one
Hyperscan pass.

Triggers are supersets of what each scanner region matches:
- a detector or custom regex in Hyperscan's *prefilter* mode (look-arounds and possessive
  quantifiers relaxed to something that matches at least as much); it reports where a match
  could end, so a window reaches back by the region's longest possible match;
- keywords and injection phrases as literals (case-insensitive, any whitespace between words)
  with the exact start of each match;
- encoded runs: one event per run of at least 12 base64 characters, one per `%XX`, one per six
  hex-dump cells, one per two quoted-printable escapes (its run walked back to its start).

A window for a region whose longest match is unbounded starts at the beginning of the text
(still correct, just slower, and only when such a trigger fires: a PEM block, say).
Without the `hyperscan` package, or for a custom pattern Hyperscan cannot compile, the scanner
scans the whole text with the regex alone (same results, slower).
"""

from __future__ import annotations

import functools
import operator
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from re import _parser as _sre_parse  # (Python >= 3.11, pyproject's requires-python)
from typing import Any

from .detectors import (AREA_CODE, DIGIT_WORDS, LOOKALIKE, LOOKALIKE_SEPS, MAX_KEY_BODY, MAX_WORD_GAP,
                        MAX_WORDED_CARD, WIDE_SEP1, WIDE_SEPC, WORD_GAP, phrase_char, wrapped_end, wrapped_start)

try:
    import hyperscan
except ImportError:  # pragma: no cover - a dependency; the regex alone still works
    hyperscan = None

MAX_REACH = 100_000  # longer possible matches count as unbounded
# Characters the regex's case-insensitive matching folds onto ASCII letters; mapped in a second
# rendering of a text that has them (Hyperscan's caseless mode is ASCII only: `_renderings`).
_FOLD = (("\u0130", "i"), ("\u0131", "i"), ("\u017f", "s"), ("\u212a", "k"))
# Hyperscan reads the text as Latin-1 bytes: each character past Latin-1 is `?` to it.
_MARKER = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>\)")
_NAMED = re.compile(r"\(\?P<[A-Za-z_][A-Za-z0-9_]*>")


@dataclass(frozen=True, slots=True)
class Trigger:
    expression: str
    som: bool  # reports the match start (else only its end)
    reach: int | None  # a value may start this many characters before the reported offset; None: anywhere;
    # -1: the trigger ends a run of base64 characters, which starts where the run does (a run
    # wrapped over lines: read from its first line to its last, `detectors.WRAPPED_LINES`);
    # -2: the trigger is an escape inside a URL-encoded run, which starts where the run does;
    # -3: the same inside a quoted-printable run; -4: hex-dump cells, in a run that starts where
    # a walk back over hex digits and separators ends
    caseless: bool = False
    tail: int = 256  # how far past the trigger's end the regex reads (longer values: read again, whole)
    verify: bool = False  # ask the scanner first whether the matched run (start..end-1) is worth a window


def regex_trigger(source: str, boundary: str) -> Trigger:
    """A scanner region's own regex, in prefilter mode (`_unicode_classes`); reach = its longest match."""
    expression = _NAMED.sub("(?:", _MARKER.sub("", f"{boundary}(?:{source})"))
    try:
        longest = _sre_parse.parse(expression).getwidth()[1]
    except Exception:  # noqa: BLE001 - unknown width: a window from the start
        longest = MAX_REACH + 1
    return Trigger(_unicode_classes(expression), som=False, reach=longest if longest <= MAX_REACH else None, tail=4)


# Python's \w, \d and \s take characters of every script (`josé`, `١٢٣`, U+3000), Hyperscan's
# are ASCII (and it sees `?` for every character past Latin-1): in a user's regex they become
# classes that take those bytes too, \b and \B go (a superset either way), and a negated class
# with \W, \D or \S (`[^\W\d_]`: a letter) also takes them.
_CLASS_ESCAPES = {"w": r"\w\x80-\xff?", "d": r"0-9?", "s": r"\s\x1c-\x1f\x85\xa0?"}


def _unicode_classes(expression: str) -> str:
    """`expression` with Python's Unicode classes widened for Hyperscan (see above)."""
    out: list[str] = []
    i, n = 0, len(expression)
    start = -1  # where the class being read starts in `out` (-1: outside one)
    negated = wide = False
    while i < n:
        c = expression[i]
        if c == "\\" and i + 1 < n:
            e = expression[i + 1]
            if e in _CLASS_ESCAPES and not negated:
                out.append(_CLASS_ESCAPES[e] if start >= 0 else f"[{_CLASS_ESCAPES[e]}]")
            elif e in "bB" and start < 0:
                pass
            else:
                wide = wide or negated and e in "WDS"
                out.append(expression[i:i + 2])
            i += 2
            continue
        if start < 0 and c == "[":
            start, negated, wide = len(out), expression.startswith("^", i + 1), False
            head = 2 if negated else 1
            head += expression.startswith("]", i + head)  # (a `]` first is a literal)
            out.append(expression[i:i + head])
            i += head
            continue
        out.append(c)
        if start >= 0 and c == "]":
            if wide:
                out[start:] = ["(?:", *out[start:], r"|[\x1c-\x1f\x80-\xff?])"]
            start, negated, wide = -1, False, False
        i += 1
    return "".join(out)


def phrase_trigger(phrase: str) -> Trigger:
    """A normalized keyword/phrase as the scanner matches it (`detectors.phrase_char`,
    `PHRASE_GAP`): words apart by anything but a letter or digit, or by nothing."""
    return Trigger(_words(phrase), som=True, reach=1, caseless=True)


# What the regex's \s takes: the string boundary U+001F too, and Unicode spaces (not in a
# normalized text: NBSP, U+3000...).
_WS = r"[\s\x1c-\x1f\x85\xa0?]"
_LOOK, _LOOK_SEP = re.escape(LOOKALIKE), f"[{re.escape(LOOKALIKE_SEPS)}]"
_MIXED = rf"(?:[0-9]{_LOOK_SEP}?[{_LOOK}]|[{_LOOK}]{_LOOK_SEP}?[0-9])"  # a digit beside a letter that looks like one
# A number written one digit per group (`[4, 1, 1, …]`, a card's or an SSN's list of digits):
# its first six, each alone (so no dotted quad or time fires it); up to 16 separators apart,
# the other 13 in the tail.
_DIGIT_LIST = Trigger(rf"[^0-9][0-9](?:{WIDE_SEP1}{{1,16}}[0-9]){{5}}{WIDE_SEP1}", som=False, reach=200,
                      tail=13 * 33)
# Look-alike letters among a number's digits (`4lll llll …`, `O78-O5-ll2O`: `_LOOKALIKE_CARD`,
# `_LOOKALIKE_SSN`): a digit beside such a letter, three more either side (`gpt-4o` is none),
# not in a word (such a run never is: the `o` of `to 3600` or of `4.12.3 of` fired on every
# such phrase in mixed text, 1,284 windows a megabyte).
_NOT_IN_WORD = rf"(?:[^A-Za-z_]|[{_LOOK}])"
_LOOKALIKE_DIGITS = Trigger(rf"(?:^|{_NOT_IN_WORD})(?:(?:[0-9{_LOOK}]{_LOOK_SEP}?){{3}}{_MIXED}"
                            rf"|{_MIXED}(?:{_LOOK_SEP}?[0-9{_LOOK}]){{3}})(?:{_NOT_IN_WORD}|$)",
                            som=False, reach=25, tail=24)
# Digits either side of separators with an escape among them (`4111\n1111`, `078\t05`: an
# escape is two characters, `detectors.WIDE_SEP1`); apart from the one-character triggers, which
# fire on every date and time and would read wider windows for them. The escape may be between
# any two of a value's groups: the window reaches over the longest (19 digits, 16 escapes apart).
_ESCAPED_SEPARATORS = Trigger(rf"[0-9]{WIDE_SEP1}{{0,15}}\\[nrt]{WIDE_SEP1}{{0,15}}[0-9]", som=False,
                              reach=19 + 18 * 32, tail=19 + 18 * 32)
# Nine digits with separators (a card or SSN in one string), or digits on both sides of a seam
# between strings (one split over strings: it may start ~170 characters before the seam).
_DIGIT_RUNS = (Trigger(r"[0-9](?:[ .\-/_\t\r\n]{0,3}[0-9]){8}", som=False, reach=34, tail=512),
               Trigger(r"[0-9][ .\-/_\t\r\n]{0,3}\x1f(?:[A-Za-z_][A-Za-z0-9_.\-]{0,63}[\x1e\x1f]){0,6}[ .\-/_\t\r\n]{0,3}[0-9]",
                       som=False, reach=600, tail=200))


def _longest(expression: str) -> int:
    """The longest text a (bounded) trigger expression matches."""
    return _sre_parse.parse(expression).getwidth()[1]


# An address's local part (64 characters) and the whitespace before a written-out `@` (16)
# come before an e-mail trigger: its window reaches back over them and the trigger itself.
_EMAIL_BEFORE = 64 + 16


def _email_trigger(expression: str, caseless: bool, before: str = "") -> Trigger:
    """`before`: what else may come between the whitespace and the trigger (`{ @`)."""
    return Trigger(expression, som=False, reach=_EMAIL_BEFORE + _longest(before + expression), tail=260,
                   caseless=caseless)


_IBAN_CC = "AD|AE|AL|AT|AZ|BA|BE|BG|BH|BR|CH|CR|CY|CZ|DE|DK|DO|EE|ES|FI|FO|FR|GB|GE|GI|GL|GR|GT|HR|HU|IE|IL|IS|IT|JO|" \
           "KW|KZ|LB|LI|LT|LU|LV|MC|MD|ME|MK|MR|MT|MU|NL|NO|PK|PL|PS|PT|QA|RO|RS|SA|SE|SI|SK|SM|TN|TR|UA|VG|XK"

# An sk- key's short head and its next piece (`detectors._KEY_PIECES`: in the same string or the
# next one), at a word's start: inside a word (`risk-based `, `task-level `) it would fire on prose.
# (A key's 300 characters, then up to 200 pieces of 300 and their separators of up to 3.)
_KEY_TAIL = 300 + 200 * 303
_KEY_HEAD = Trigger(r"(?:^|[^A-Za-z0-9_\-])sk-[A-Za-z0-9_\-]{0,19}"
                    r"(?:[ \t]{1,3}|\r?\n|(?:\\[nrt]){1,2}|[ \t\r\n]{0,3}\x1f[ \t\r\n]{0,3})[A-Za-z0-9_\-]", som=False,
                    reach=31, tail=_KEY_TAIL)
# (and a head cut itself: `sk -proj-…`, `s k-…`)
_KEY_CUT_HEAD = Trigger(r"(?:^|[^A-Za-z0-9_\-])s(?:(?:[ \t]{1,3}|\r?\n)k(?:[ \t]{1,3}|\r?\n)?|k(?:[ \t]{1,3}|\r?\n))-",
                        som=False, reach=10, tail=_KEY_TAIL)

# Hand-written triggers of the built-in detectors: each fires wherever the detector's regex
# could match (on a prefix, or a part every match contains). Fixed-width triggers report their
# end only (cheaper than start-of-match tracking): `reach` covers their width plus how far
# before them a value may begin. The regex then reads on to `tail` past the trigger.
BUILTIN_TRIGGERS: dict[str, tuple[Trigger, ...]] = {
    # (read on to where the END line may be, BEGIN and END lines under 80 characters: short of
    # it the regex takes the header and the base64 lines up to the first indented or blank one)
    "private_key": (Trigger("----BEGIN", som=False, reach=11, tail=MAX_KEY_BODY + 2 * 80),
                    Trigger("Private-Lines:", som=False, reach=15, tail=MAX_KEY_BODY)),
    # (a header written by hand, `eyA`, `ewo`…, after a boundary only: `reworking` holds `ewo`)
    "jwt": (Trigger(r"eyJ[A-Za-z0-9_\-]{5}|(?:^|[^A-Za-z0-9_])e(?:yA|wo|w0K|wk)[A-Za-z0-9_\-]{5}", som=False,
                    reach=11),),
    "anthropic_key": (Trigger(r"sk-[A-Za-z0-9_\-]{20}", som=False, reach=24, tail=_KEY_TAIL), _KEY_HEAD, _KEY_CUT_HEAD),
    "openai_key": (Trigger(r"sk-[A-Za-z0-9_\-]{20}", som=False, reach=24, tail=_KEY_TAIL), _KEY_HEAD, _KEY_CUT_HEAD),
    "gateway_key": (Trigger(r"gwk_[a-z0-9]", som=False, reach=6, tail=370),),
    "gateway_admin_token": (Trigger(r"gwa_[A-Za-z0-9_\-]{32}", som=False, reach=37, tail=300),),
    "github_token": (Trigger(r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}", som=False, reach=41,
                             tail=252),
                     Trigger(r"gh[pousr]_[A-Za-z0-9]{1,35}[ \t\r\n\x1f\-.,_]", som=False, reach=41, tail=300)),
    "aws_access_key": (Trigger(r"(?:AKIA|ASIA)[A-Z0-9]{16}|(?:AKIA|ASIA)[ .\-_/][A-Z0-9]{4}", som=False, reach=21,
                               tail=24),
                       # (its head ending one of a request's strings: the rest, past a role, in the next)
                       Trigger(r"(?:AKIA|ASIA)[A-Z0-9]{0,15}\x1f", som=False, reach=21, tail=90)),
    # (each service's prefix and as much of its token as every match holds: a prefix alone
    # fires on identifiers, `hf_hub_download`, `npm_config_cache`, and each window costs the
    # regex ~50 us; HTTP Basic credentials from the first capital, digit or sign past their
    # base64's first character, which no word after "basic" in prose has ("basic" alone fired
    # on every "basic idea"; `user:password` encodes so whenever the password has 2 characters)
    "service_token": (Trigger(r"[sr]k_(?:live|test|prod)_[A-Za-z0-9]{20}|xox[abeoprs]-[0-9]{6}|xapp-[0-9]-"
                              r"|hooks\.slack\.com/services/T|AIza[0-9A-Za-z_\-]{35}|(?:hf|api_org)_[A-Za-z]{34}"
                              r"|glpat-[0-9A-Za-z_\-]{20}|npm_[A-Za-z0-9]{36}|SG\.[A-Za-z0-9_\-]{22}\."
                              r"|AccountKey=[A-Za-z0-9+/]{86}", som=False, reach=99, tail=330),
                      Trigger(r"secret_?access_?key", som=False, reach=21, tail=80, caseless=True),
                      Trigger(r"[Bb][Aa][Ss][Ii][Cc][ \t]{1,3}[A-Za-z0-9+/][A-Za-z0-9+/]*[A-Z0-9+/=]", som=False,
                              reach=312, tail=300)),
    "iban": (Trigger(r"[^A-Za-z0-9_][A-Za-z]{2}[0-9]{2}", som=False, reach=5, tail=160),),  # 30 characters, 4 separators apart
    "email": tuple(_email_trigger(*args) for args in (
        # (`jane { @ } example.com`, `"jane" + "@" + …`: the longer)
        ("@", False, rf"[\"']{_WS}{{0,16}}(?:\+|\|\||[.&,]){_WS}{{0,16}}[\"']"),
        (rf"[(\[{{<]{_WS}{{0,16}}(?:at|arroba){_WS}{{0,16}}[)\]}}>]", True),
        # a bare ` at ` (` arroba `), a label and any written-out dot after it (`.`, ` dot `,
        # ` period `, ` punto `, ` . `, `(dot)`, `[.]`, `"dot"`, `-dot-`, `&#46;`, `&period;`)
        (rf"{_WS}(?:at|arroba){_WS}{{1,16}}[A-Za-z0-9\-]{{1,63}}"
         rf"(?:{_WS}{{0,16}}(?:[.(\[{{<\"'\-]|dot|period|punto)|&#|&period;)", True),
        (r"[\"']at[\"']", True),
        (r"[A-Za-z0-9_%+\-][(\[]a[)\]][A-Za-z0-9]", True),  # (glued: `(a)` alone opens lists)
        (r"&#0{0,4}64;|&#[xX]0{0,4}40;|&commat;", False),
        # `-at-` (`jane-at-example-dot-com`: a local part of up to 64 characters before it,
        # validate_email) and `-dot-` after an '@' or a written-out one (the '@' fires)
        (rf"-{_WS}{{0,2}}at{_WS}{{0,2}}-", True))),
    "credit_card": _DIGIT_RUNS + (Trigger(rf"[0-9]{{4}}{WIDE_SEPC}{{1,16}}[0-9]{{4}}", som=False, reach=26, tail=64),
                                  _ESCAPED_SEPARATORS,
                                  _DIGIT_LIST,
                                  _LOOKALIKE_DIGITS,
                                  # words between groups (`4111x1111x…`, `4111 x 1111 …`, `4111 1111 (then)
                                  # 1111 …`: `_LETTERED_CARD`; a gap is MAX_WORD_GAP characters at most,
                                  # and any of a card's four or five gaps may be the one that fires)
                                  Trigger(rf"[0-9]{{4}}{WORD_GAP}[0-9]{{4}}", som=False, reach=MAX_WORDED_CARD,
                                          tail=MAX_WORDED_CARD),
                                  # thousands groups (`4,111,111,111,111,111`: `_COMMA_CARD`)
                                  Trigger(r"[0-9](?:,[0-9]{3}){4}", som=False, reach=21, tail=12)),
    "us_ssn": _DIGIT_RUNS + (Trigger(rf"[0-9]{{3}}{WIDE_SEPC}{{1,16}}[0-9]{{2}}{WIDE_SEPC}{{1,16}}[0-9]", som=False,
                                     reach=40, tail=8), _ESCAPED_SEPARATORS, _LOOKALIKE_DIGITS, _DIGIT_LIST,
                             # words between groups (`078x05x1120`, `078 x 05 x 1120`, `078 05 (then) 1120`:
                             # `_LETTERED_SSN`; plain gaps fire the triggers above too)
                             Trigger(rf"[0-9]{{3}}{WORD_GAP}[0-9]{{2}}|[0-9]{{2}}{WORD_GAP}[0-9]{{4}}", som=False,
                                     reach=10 + 2 * MAX_WORD_GAP, tail=6 + MAX_WORD_GAP)),
    # every IPv6 address has "::", or seven colons, or six groups before an IPv4 tail
    "ipv6": (Trigger(r"::|[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){5}:[0-9A-Fa-f]", som=False, reach=48, tail=48),),
    "ipv4": (Trigger(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]", som=False, reach=14, tail=8),),
    "phone": (Trigger(rf"\+[1-9]|\({AREA_CODE}\)|"
                      r"[^A-Za-z0-9_][2-9][0-9]{2}[ .\-][2-9][0-9]{2}[ .\-][0-9]{4}"
                      r"|[^A-Za-z0-9_]0[1-9][0-9]{0,4}[ /.\-][0-9]{2}|[^A-Za-z0-9_]00[1-9][0-9]{0,4}[ .\-(]",
                      som=False, reach=18, tail=48),
              # (in no layout, after a phone word: `4155550100`, `415_555_0100`; nine digits at least:
              # the cards' and SSNs' trigger, so one event, not two, where both rules are on)
              _DIGIT_RUNS[0]),
}

# Six single characters in a row, spaced out (`SPACED_PATTERN`).
SPACED_TRIGGERS = (Trigger(r"(?:[^ \t\n\r\x0b\x0c\x1c-\x1f] {1,3}){5}[^ \t\n\r\x0b\x0c\x1c-\x1f]", som=False,
                           reach=21, tail=260),)

# Nine digit words in a row (`detectors.NUMBER_WORDS_PATTERN`), apart by what its `\s` takes
# (the string boundary too: a number read out over two messages).
_DIGIT_WORD = "(?:" + "|".join(DIGIT_WORDS) + ")"
NUMBER_WORDS_TRIGGERS = (Trigger(rf"{_DIGIT_WORD}(?:(?:{_WS}|[,\-]){{1,3}}{_DIGIT_WORD}){{8}}", som=False,
                                 reach=9 * 8, tail=260, caseless=True),)
# A digit next to a digit word (`detectors.MIXED_NUMBER_PATTERN`), whose run may begin 24
# cells of up to 19 digits and 3 separators before it; or an area code before one.
MIXED_NUMBER_TRIGGERS = (Trigger(rf"[0-9](?:{_WS}|[,\-]){{1,3}}{_DIGIT_WORD}|{_DIGIT_WORD}(?:{_WS}|[,\-]){{1,3}}[0-9]",
                                 som=False, reach=24 * 22 + 8, tail=260, caseless=True),
                         # (an area code in parentheses before a digit word: `(415) five …`)
                         Trigger(rf"\({AREA_CODE}\)[ .\-]?(?:[0-9]{{1,19}}(?:{_WS}|[,\-]){{1,3}})?{_DIGIT_WORD}",
                                 som=False, reach=34, tail=260, caseless=True))

# (cells of printable ASCII bytes, 0x20-0x7f: led by a digit, which Hyperscan skips to; a class
# of letters first cost ~3 us on the bench's 2 KB of prose)
_HEX_CELL = r"(?:0[xX])?[2-7][0-9A-Fa-f](?:[2-7][0-9A-Fa-f])?"
_HEX_DUMP_CELLS = rf"{_HEX_CELL}(?:(?:[,:;]?[ \t]{{1,2}}|[,:;]|,?\r?\n){_HEX_CELL}){{5}}"
ENCODED_TRIGGERS = (
    # the end of every run of 12 or more: its start is found by walking back (`verify` runs)
    Trigger(r"[A-Za-z0-9+/_\-]{12}[^A-Za-z0-9+/_\-]", som=False, reach=-1, tail=4, verify=True),
    # every `%XX`: its run (plain characters and escapes, however long) starts where a walk back finds
    Trigger(r"%[0-9A-Fa-f]{2}", som=False, reach=-2, tail=260),
    Trigger(r"&#[xX]?[0-9A-Fa-f]{1,7}|\\[ux][0-9A-Fa-f]{2}", som=False, reach=261, tail=260),
)

# Hex dumps and quoted-printable runs (`detectors.HEX_DUMP`, `QUOTED_PRINTABLE`): the scanner puts
# these last among its triggers: inserted before others, the same database scanned the bench's
# 2 KB of prose ~1.5-3 us slower (Hyperscan groups its engines by pattern order).
ENCODED_RUN_TRIGGERS = (
    # six hex cells of ASCII text in a hex dump (`detectors.HEX_DUMP`; a run without them is not
    # decoded): its run starts where a walk back finds
    Trigger(_HEX_DUMP_CELLS, som=False, reach=-4, tail=260),
    # two quoted-printable escapes or soft breaks: its run starts where a walk back finds
    Trigger(r"=(?:[0-9A-Fa-f]{2}|\r?\n)[A-Za-z0-9._~+\-@]*=(?:[0-9A-Fa-f]{2}|\r?\n)", som=False, reach=-3,
            tail=260),
)


def template_trigger(template: str) -> Trigger:
    """An injection phrase template (`ignore {all |}{previous|prior} instructions`) as one
    case-insensitive regex: what each of its expansions matches, it matches."""
    parts = re.split(r"\{([^{}]*)\}", " ".join(template.split()).lower())
    out = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            out.append(_words(part))
        else:
            out.append("(?:" + "|".join(_words(alt) for alt in part.split("|")) + ")")
    return Trigger("".join(out), som=True, reach=1, caseless=True, tail=4)


def _words(text: str) -> str:
    return r"[^A-Za-z0-9]*".join("".join(map(phrase_char, w)) for w in text.split(" "))


class Prefilter:
    """A compiled Hyperscan database for a set of triggers; `windows(text)` gives the regions
    of `text` the regex must scan. Safe to share between threads (scratch space per thread)."""

    __slots__ = ("_db", "_som_db", "_som", "_params", "_local", "ascii_only")

    def __init__(self, triggers: Sequence[Trigger], ascii_only: bool) -> None:
        # `windows(text, verify)`: `verify(text, start, end)` for triggers marked `verify`.
        if hyperscan is None:
            raise RuntimeError("hyperscan is not installed")
        # Start-of-match tracking makes Hyperscan's whole pass ~3x slower once one trigger
        # needs it in earnest (an injection template starting with `tell me|give me|...`:
        # 12 us instead of 4 on the bench's 1 KB prompt). So the main database reports only
        # where every trigger ends, and the triggers that need their start are compiled
        # again, with it, into a second database that runs only on a text where one of
        # them fired (rare: a keyword or an injection phrase), giving the same events.
        self._db = _compile(triggers, som=False)
        self._som = frozenset(i for i, t in enumerate(triggers) if t.som)
        self._som_db = _compile([t for t in triggers if t.som], som=True,
                                ids=[i for i, t in enumerate(triggers) if t.som]) if self._som else None
        self._params = [(t.som, t.reach, t.tail, t.verify) for t in triggers]
        self._local = threading.local()
        self.ascii_only = ascii_only  # some trigger is not ASCII: non-ASCII text goes to the regex alone

    def usable(self, text: str) -> bool:
        return text.isascii() or not self.ascii_only

    def windows(self, text: str, verify: Callable[[str, int, int], bool] | None = None,
                ) -> list[tuple[int, int, int]] | None:
        """Sorted (start, limit, end) windows: every match of the scanner's regex has its
        boundary character at some `p` with start <= p < limit of a window, and the regex
        needs to read no further than `end` to find it (or reads again when a hit reaches it).
        None: candidates are so dense (over one per 16 characters) that the caller should scan
        the whole text instead."""
        datas = _renderings(text)
        scratches = getattr(self._local, "scratches", None)
        if scratches is None:
            scratches = self._local.scratches = (hyperscan.Scratch(self._db),
                                                 hyperscan.Scratch(self._som_db) if self._som_db else None)
        events: list[tuple[int, int, int]] = []
        try:
            collect = _collect if len(text) >= SHORT_TEXT else _collect_short
            for data in datas:
                self._db.scan(data, match_event_handler=collect, context=events, scratch=scratches[0])
            som = self._som
            if som and any(e[0] in som for e in events):  # their starts: the second database
                events = [e for e in events if e[0] not in som]
                for data in datas:
                    self._som_db.scan(data, match_event_handler=_collect, context=events, scratch=scratches[1])
            if len(datas) > 1:
                events.sort(key=_END)  # (URL-encoded runs are walked in order)
        except hyperscan.ScanTerminated:
            return None  # more candidates than text: the regex over the whole text is cheaper
        if not events:
            return []
        params = self._params
        n = len(text)
        spans = []
        runs = dict.fromkeys(_WALKS, (0, -1))  # (start, end) of the last run of each kind walked back over
        for i, frm, to in events:
            som, reach, tail, check = params[i]
            if reach == -1:  # a run ending at to - 1: walk back to its start
                frm = _run_start(text, to - 1, _RUN)
                if wrapped_start(text, frm):  # a later line of a wrapped run: read from its first
                    continue
                to = wrapped_end(text, to - 1) + 1
                som, reach = True, 1
            elif reach in _WALKS:  # an escape ending at `to` inside a URL-encoded (quoted-printable)
                # run, or hex-dump cells: the run's start (events come in order: an event in the
                # run already walked reuses its start, so a long run costs one walk, not one each)
                chars = _WALKS[reach]
                start, end = runs[reach]
                if not (end >= 0 and not text[end:to].strip(chars)):
                    start = _run_start(text, to, chars)
                runs[reach] = (start, to)
                if reach != -2:  # (the walk crosses line breaks or words a run may start after: up to `to`)
                    spans.append((max(0, start - 2), min(to, n), min(to + tail, n)))
                    continue
                frm, som, reach = start, True, 1
            if check and verify is not None and not verify(text, frm, to - 1):
                continue
            at = frm if som else to
            start = 0 if reach is None else max(0, at - reach - 1)
            # A value's boundary character comes before the value, which starts at or before the
            # trigger: before its start + 1 (reported start) or its end - 1 (end only).
            spans.append((start, min(frm + 1 if som else to - 1, n), min(to + tail, n)))
        if not spans:
            return []
        spans.sort()
        out: list[tuple[int, int, int]] = []
        cs, cl, ce = spans[0]
        for s, li, e in spans[1:]:
            if s <= cl:
                cl, ce = max(cl, li), max(ce, e)
            else:
                out.append((cs, cl, ce))
                cs, cl, ce = s, li, e
        out.append((cs, cl, ce))
        return out


def _renderings(text: str) -> tuple[bytes, ...]:
    """What Hyperscan scans for `text`: its Latin-1 bytes, and for a text with a character the
    regex's case-insensitive matching folds onto an ASCII letter (`ı`, `İ`), the text with it
    folded too (for the caseless triggers: a phrase or a keyword), as the case-sensitive ones
    (a boundary before a value, `[^A-Za-z0-9_]`) must see it as it is."""
    if text.isascii():
        return (text.encode("ascii") + b"\n",)
    data = text.encode("latin-1", "replace") + b"\n"
    if not any(c in text for c, _ in _FOLD):  # (str.translate costs ~50 ns a character)
        return (data,)
    for c, ascii_letter in _FOLD:
        text = text.replace(c, ascii_letter)
    return data, text.encode("latin-1", "replace") + b"\n"


_END = operator.itemgetter(2)


def _compile(triggers: Sequence[Trigger], som: bool, ids: Sequence[int] | None = None) -> Any:
    """A block-mode database of `triggers`; with `som`, those marked `som` report their start."""
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    flags = [(hyperscan.HS_FLAG_SOM_LEFTMOST if t.som and som else 0 if t.som else hyperscan.HS_FLAG_PREFILTER)
             | (hyperscan.HS_FLAG_CASELESS if t.caseless else 0) | hyperscan.HS_FLAG_ALLOWEMPTY
             for t in triggers]
    db.compile(expressions=[t.expression.encode("latin-1") for t in triggers],
               ids=list(range(len(triggers))) if ids is None else list(ids), flags=flags)
    return db


_RUN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-"
_URL_RUN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+-%"
_QP_RUN = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~+-@=\r\n"
_WALKS = {-2: _URL_RUN, -3: _QP_RUN, -4: "0123456789abcdefABCDEFxX ,:;\t\r\n"}


def _run_start(text: str, end: int, chars: str) -> int:
    """Where the run of `chars` ending at `end` (exclusive) starts, however long (an encoded
    run padded past any bound must not hide what it ends with): `rstrip` over a slice doubled
    until the run's start is in it."""
    lo = max(0, end - 64)
    while True:
        kept = len(text[lo:end].rstrip(chars))
        if kept or lo == 0:
            return lo + kept
        lo = max(0, end - 2 * (end - lo))


MAX_EVENTS_PER_CHAR = 1 / 16  # hostile or degenerate text (a megabyte of digits): stop counting


# A text this short costs the regex little more than its Hyperscan events cost in Python
# callbacks when they are dense (an id of twenty digits fires at each): there the prefilter
# gives up after a few, where a long text's early cluster must not make it give up.
SHORT_TEXT = 256


def _collect(i: int, frm: int, to: int, _flags: int, events: list[tuple[int, int, int]]) -> bool:
    events.append((i, frm, to))
    return len(events) > 64 and len(events) > to * MAX_EVENTS_PER_CHAR


def _collect_short(i: int, frm: int, to: int, _flags: int, events: list[tuple[int, int, int]]) -> bool:
    events.append((i, frm, to))
    return len(events) > 4 and len(events) > to * MAX_EVENTS_PER_CHAR


@functools.lru_cache(maxsize=32)
def build(triggers: tuple[Trigger, ...], ascii_only: bool) -> Prefilter | None:
    """The prefilter, or None when Hyperscan is missing or cannot compile some trigger (the
    scanner then scans whole texts with the regex). Cached: a config reload with the same
    rules, or another scanner with the same triggers, reuses the compiled database."""
    if hyperscan is None:
        return None
    try:
        return Prefilter(triggers, ascii_only)
    except Exception:  # noqa: BLE001 - hyperscan.error and unsupported syntax alike
        return None
