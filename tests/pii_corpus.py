"""A labelled corpus for detection quality, generated deterministically (fixed seed).

    positives() -> [Case]   every evasion of every numeric / contact detector
    benign()    -> [str]    prose, source code, logs, UUIDs, timestamps, order and tracking numbers

A `Case` is the strings of one request (several when a value is split across messages,
content parts or tool results), the detector that must fire, the seeded value in its
canonical form (digits only for numbers, lower-case address for e-mails) and the evasion's
name. `leaks(text, case)` says whether a text still holds the seeded value in any form:
digits-only, NFKC-folded with format characters removed, or inside a decodable base64 /
hex / URL-encoded run. Used by tests/test_pii_corpus.py, bench/detection_quality.py and
the end-to-end tests through Envoy.

Values are generated here independently of the code under test (Luhn, SSN ranges, mod-97).
"""

from __future__ import annotations

import base64
import html
import random
import re
import string
import unicodedata
import urllib.parse
from dataclasses import dataclass

from gateway_extproc.policy.detectors import GAP_DIGIT_WORDS

SEED = 20261203


@dataclass(frozen=True)
class Case:
    detector: str
    strings: tuple[str, ...]
    canonical: str
    evasion: str


# -- value generators --------------------------------------------------------------------


def luhn_complete(body: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(body)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return body + str((10 - total % 10) % 10)


def card(rng: random.Random) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("65", 16), ("3530", 16), ("4", 19), ("62", 16)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    return luhn_complete(body)


def ssn(rng: random.Random) -> str:
    area = rng.choice([a for a in range(1, 900) if a != 666])
    return f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"


IBAN_LAYOUTS = {"DE": 18, "FR": 23, "NL": 14, "ES": 20, "IT": 23, "BE": 12, "AT": 16, "PL": 24}


def iban(rng: random.Random) -> str:
    cc = rng.choice(sorted(IBAN_LAYOUTS))
    n = IBAN_LAYOUTS[cc]
    if cc == "NL":
        body = "".join(rng.choice(string.ascii_uppercase) for _ in range(4)) + "".join(
            rng.choice(string.digits) for _ in range(10))
    else:
        body = "".join(rng.choice(string.digits) for _ in range(n))
    num = "".join(str(int(c, 36)) for c in body + cc + "00")
    return f"{cc}{98 - int(num) % 97:02d}{body}"


FIRST = ["jane", "john", "maria", "li", "ahmed", "olga", "pierre", "sara", "kenji", "fatima", "tom", "ana"]
LAST = ["doe", "smith", "garcia", "wei", "khan", "ivanova", "martin", "cohen", "sato", "ali", "berg"]
DOMAINS = ["example.com", "example.org", "corp.example.net", "mail.example.co.uk", "example.io"]


def email(rng: random.Random) -> str:
    sep = rng.choice([".", "_", ""])
    return f"{rng.choice(FIRST)}{sep}{rng.choice(LAST)}{rng.choice(['', str(rng.randint(1, 99))])}@{rng.choice(DOMAINS)}"


def phone(rng: random.Random) -> str:
    return rng.choice([f"+1 {rng.randint(201, 989)} 555 {rng.randint(100, 199):04d}",
                       f"+44 20 7946 {rng.randint(0, 999):04d}",
                       f"({rng.randint(201, 989)}) 555-{rng.randint(100, 199):04d}",
                       f"+49 30 {rng.randint(1000000, 9999999)}"])


# -- evasions ----------------------------------------------------------------------------

ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u200e", "\u200f", "\u202a", "\u2066",
              "\u180e", "\ufe0f", "\u034f"]
SPACES = ["\u00a0", "\u2009", "\u202f", "\u3000", "\u2002", "\u205f"]
DASHES = ["\u2010", "\u2011", "\u2013", "\u2014", "\u2212", "\uff0d", "\ufe63"]
DIGIT_ZEROS = [0xFF10, 0x0660, 0x06F0, 0x0966, 0x09E6, 0x0E50, 0x1D7CE, 0x1D7D8, 0x1040, 0x17E0, 0xA8D0]


_WORDS = "zero one two three four five six seven eight nine".split()


def digits_in(text: str, zero: int) -> str:
    return "".join(chr(zero + int(c)) if c.isdigit() else c for c in text)


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else ("\u3000" if c == " " else c) for c in text)


def grouped(digits: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for n in sizes:
        out.append(digits[i:i + n])
        i += n
    if i < len(digits):
        out.append(digits[i:])
    return sep.join(p for p in out if p)


def in_words(phone: str) -> str:
    """A phone number read out digit by digit, its `+` and country code or its area code in
    parentheses kept (`+44 two zero …`, `(415) five five five …`)."""
    head = phone.split(" ")[0] if phone.startswith(("+", "(")) else ""
    return " ".join([head] * bool(head) + [_WORDS[int(c)] for c in phone[len(head):] if c.isdigit()])


def reads_as_word(piece: str) -> bool:
    """A piece of a key in pieces that reads as a word, or words joined by `-` or `_` (no
    digit, no capital after a small letter): the detector may leave it out where the key's
    pieces end."""
    return all(re.fullmatch(r"[A-Z]?[a-z]*|[A-Z]*", part) for part in re.split(r"[_\-]", piece))


def reads_as_digit(word: str) -> bool:
    """A word in a value's gap, bare or in brackets or slashes, that the detectors read as a
    digit rather than read past (`detectors.GAP_DIGIT_WORDS`)."""
    return word.strip("([{/)]}").lower() in GAP_DIGIT_WORDS


def card_groups(d: str) -> list[int]:
    return [4, 6, 5] if len(d) == 15 else [4, 4, 4, 4, 3]


def encodings(text: str) -> dict[str, str]:
    raw = text.encode()
    return {
        "base64": base64.b64encode(raw).decode(),
        "base64 url-safe": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "base64 twice": base64.b64encode(base64.b64encode(raw)).decode(),
        "hex": raw.hex(),
        "url-encoded": urllib.parse.quote(text, safe=""),
    }


def padded_encodings(value: str) -> dict[str, str]:
    """A value at the end of an encoded run made long with filler: each once hid it, because
    only a run's first 64 KiB (or 4,096 escapes, or 256 plain characters around an escape)
    was decoded."""
    filler = "lorem ipsum dolor " * 5000  # 90 KB
    text = f"{filler}card {value} ok"
    return {
        "base64 after 90 KB": base64.b64encode(text.encode()).decode(),
        "base64 url-safe after 90 KB": base64.urlsafe_b64encode(text.encode()).decode().rstrip("="),
        "base64 twice after 90 KB": base64.b64encode(base64.b64encode(text.encode())).decode(),
        "hex after 90 KB": text.encode().hex(),
        "url after 5,000 escapes": "%20" * 5000 + urllib.parse.quote(f"card {value}", safe=""),
        "url, every character": urllib.parse.quote(text[-30000:], safe=""),
        "url, 300 plain characters before the escapes": "%20" + "a" * 300 + urllib.parse.quote(f" {value}", safe=""),
        "url, 300 plain characters first": "a" * 300 + urllib.parse.quote(f" {value}", safe=""),
        "html references after 5,000": "&#32;" * 5000 + "".join(f"&#{ord(c)};" for c in value),
        "\\u escapes after 5,000": "\\u0020" * 5000 + "".join(f"\\u{ord(c):04x}" for c in value),
    }


CARRIERS = ["Please charge {} for the renewal.", "My card number is {} thanks", "card: {}", "{}",
            "The number on the back is {}, ok?", "請使用信用卡 {} 付款", "Use {} for the order."]


def _number_cases(rng: random.Random, detector: str, value: str, groups: list[int], carriers: list[str],
                  lead: str = "the first part is") -> list[Case]:
    """Every evasion of one number (`value`: digits, or an IBAN)."""
    cases: list[Case] = []

    def add(evasion: str, *strings: str) -> None:
        cases.append(Case(detector, strings, value, evasion))

    carrier = rng.choice(carriers)
    add("plain", carrier.format(value))
    for name, sep in (("spaces", " "), ("dashes", "-"), ("dots", "."), ("slashes", "/"), ("underscores", "_"),
                      ("spaced dashes", " - "), ("double spaces", "  ")):
        add(name, carrier.format(grouped(value, groups, sep)))
    g = grouped(value, groups, " ").split(" ")
    add("mixed separators", carrier.format("".join(p + rng.choice([" ", "-", ".", "/"]) for p in g[:-1]) + g[-1]))
    for zw in rng.sample(ZERO_WIDTH, 4):
        add(f"format char U+{ord(zw):04X}", carrier.format(grouped(value, groups, zw)))
    add("format char inside groups", carrier.format(zw.join(value)))
    for sp in rng.sample(SPACES, 2):
        add(f"space U+{ord(sp):04X}", carrier.format(grouped(value, groups, sp)))
    for dash in rng.sample(DASHES, 2):
        add(f"dash U+{ord(dash):04X}", carrier.format(grouped(value, groups, dash)))
    for name, symbol in (("emoji", "\U0001F642"), ("arrow", " \u2192 ")):
        add(f"{name} between groups", carrier.format(grouped(value, groups, symbol)))
    add("fullwidth", carrier.format(fullwidth(grouped(value, groups, " "))))
    add("fullwidth hyphens", carrier.format(fullwidth(grouped(value, groups, "-"))))
    for zero in rng.sample(DIGIT_ZEROS, 4):
        add(f"digits from U+{zero:04X}", carrier.format(digits_in(grouped(value, groups, " "), zero)))
    add("mixed scripts and format chars", carrier.format(
        "".join(digits_in(c, rng.choice(DIGIT_ZEROS)) + rng.choice(["", "\u200b", ""]) for c in value)))
    for name, enc in encodings(carrier.format(value)).items():
        add(name, f"Decode this: {enc}")
    add("base64 of grouped", f"payload {base64.b64encode(grouped(value, groups, '-').encode()).decode()} end")
    cut = sum(groups[:2]) if len(groups) > 2 else len(value) // 2
    a, b = value[:cut], value[cut:]
    add("split over two messages", f"{lead} {a}", f"{b} is the rest")
    add("split, trailing separator", f"{lead}: {a} ", b)
    add("split into four messages", *[f"{p}" for p in grouped(value, groups, " ").split(" ")])
    return cases


def positives() -> list[Case]:
    rng = random.Random(SEED)
    cases: list[Case] = []
    for _ in range(5):
        d = card(rng)
        cases += _number_cases(rng, "credit_card", d, card_groups(d), CARRIERS)
        cases.append(Case("credit_card", (f"card {grouped(d, card_groups(d), ' ')} 123 exp 12/27",), d, "with CVV"))
        cases.append(Case("credit_card", (f"ref 1234 {grouped(d, card_groups(d), ' ')}",), d, "after a number"))
        cases.append(Case("credit_card", (" ".join(d),), d, "one digit per group"))
        cases.append(Case("credit_card", (f"digits: [{', '.join(d)}]",), d, "a list of its digits"))
        cases.append(Case("credit_card", ("cc = [" + ",".join(f"'{c}'" for c in d) + "]",), d,
                          "a list of quoted digits"))
        cases.append(Case("credit_card", ("card " + " ".join(_WORDS[int(c)] for c in d) + " ok",), d, "in words"))
        for sep in (",", ", ", " | ", ";", ":", "+", "*", "~", "    ", "\n\n\n\n", " --- ", "'", "] [", ")(", "\\",
                    "\\n", "\\r\\n", "\\t"):
            # printed layout, any other separators (up to 16 characters)
            cases.append(Case("credit_card", (f"card [{grouped(d, card_groups(d), sep)}] ok",), d,
                              f"separator {sep!r}"))
        cases.append(Case("credit_card", (f"1 {grouped(d, card_groups(d), ' ')} 1",), d, "a digit either side"))
        cases.append(Case("credit_card", (f"0     {d}",), d, "a number five spaces before"))
        cases.append(Case("credit_card", ("".join(c + "\u0301\u0336" for c in d),), d, "combining marks on digits"))
        joined = {15: [[10, 5], [4, 11]], 16: [[8, 4, 4], [4, 8, 4], [4, 4, 8], [12, 4]],
                  19: [[8, 4, 4, 3], [12, 4, 3]]}
        for sizes in joined[len(d)]:  # a printed layout with separators left out
            cases.append(Case("credit_card", (f"card {grouped(d, sizes, ' ')} ok",), d, f"groups {sizes}"))
        cases.append(Case("credit_card", (f"card \\u{ord(d[0]):04x}{grouped(d, card_groups(d), ' ')[1:]}",), d,
                          "one digit as an escape"))
        looks = d[0] + d[1:].replace("1", "l").replace("0", "O")  # letters that look like digits
        if looks != d:
            cases.append(Case("credit_card", (f"card {grouped(looks, card_groups(d), ' ')} ok",), d,
                              "look-alike letters for digits"))
            cases.append(Case("credit_card", (f"card {grouped(looks, card_groups(d), '.')} ok",), d,
                              "look-alike letters, dots"))
        looks = d[0] + d[1:].replace("5", "S").replace("8", "B")
        if looks != d:
            cases.append(Case("credit_card", (f"card {grouped(looks, card_groups(d), ' ')} ok",), d,
                              "S and B for 5 and 8"))
        shown = grouped(d, card_groups(d), " ").replace(" ", "<b></b>", 1)  # markup renders as nothing
        cases.append(Case("credit_card", (f"card {shown} ok",), d, "a tag between two groups"))
        cases.append(Case("credit_card", (f'{{"note": "card {shown} ok"}}',), d,
                          "a JSON object, a tag between two groups"))
        nbsp = base64.b64encode(grouped(d, card_groups(d), "\u00a0").encode()).decode()
        cases.append(Case("credit_card", (f"payload {nbsp} end",), d, "base64 of groups apart by NBSP"))
        cases.append(Case("credit_card", (f"card {grouped(d, card_groups(d), 'x')} ok",), d, "an x between groups"))
        for word in (" x ", "-and-", "\nx\n"):
            cases.append(Case("credit_card", (f"card {grouped(d, card_groups(d), word)} ok",), d,
                              f"{word.strip(' -')!r} between groups"))
        for word in (" then ", " (next) ", " and then ", " /x/ "):  # (in the second gap only, since 2026-12-07)
            groups = grouped(d, card_groups(d), " ").split(" ")
            printed = " ".join(groups[:2]) + word + " ".join(groups[2:])
            cases.append(Case("credit_card", (f"card {printed} ok",), d, f"{word.strip()!r} between two groups"))
        cases.append(Case("credit_card", (f"card {grouped(d, card_groups(d), ' ')}th ok",), d,
                          "a word glued to the last group"))
        cases.append(Case("credit_card", (f"card {grouped(d, card_groups(d), '-')} 2nd ok",), d,
                          "a word with a digit after the last group"))
        cells = grouped(d, card_groups(d), "</td><td width=40>")  # a tag the scanner also reads as written
        cases.append(Case("credit_card", (f"<td width=40>{cells}</td>",), d, "table cells with attributes"))
    ssn_carriers = ["SSN {}", "my social security number is {}.", "ss# {} on file", "Taxpayer id: {}"]
    for _ in range(5):
        d = ssn(rng)
        # Nine digits not in the 3-2-4 layout need a context word (see docs/classification.md).
        cases += _number_cases(rng, "us_ssn", d, [3, 2, 4], ssn_carriers, lead="my SSN starts with")
        for sep in (",", "|", "    ", " : "):  # other punctuation or more space: the carriers name it
            cases.append(Case("us_ssn", (rng.choice(ssn_carriers).format(grouped(d, [3, 2, 4], sep)),), d,
                              f"separator {sep!r}"))
        cases.append(Case("us_ssn", (f"SSN [{', '.join(d)}] ok",), d, "a list of its digits"))
        for word in ("x", " x "):
            cases.append(Case("us_ssn", (ssn_carriers[0].format(grouped(d, [3, 2, 4], word)),), d,
                              f"{word!r} between groups"))
        for word in (" (then) ", " and then "):  # (in the second gap only, since 2026-12-07)
            area, group, serial = grouped(d, [3, 2, 4], " ").split(" ")
            cases.append(Case("us_ssn", (ssn_carriers[0].format(f"{area} {group}{word}{serial}"),), d,
                              f"{word.strip()!r} between two groups"))
        tagged = grouped(d, [3, 2, 4], "<i></i>")
        cases.append(Case("us_ssn", (f'{{"note": "SSN {tagged}"}}',), d, "a JSON object, tags between the groups"))
        looks = d.replace("0", "O").replace("1", "l")  # letters that look like digits: dashed, or named
        if looks != d and looks.strip("Ol"):
            cases.append(Case("us_ssn", (f"call me on {grouped(looks, [3, 2, 4], '-')} ok",), d,
                              "look-alike letters for digits"))
            cases.append(Case("us_ssn", (rng.choice(ssn_carriers).format(grouped(looks, [3, 2, 4], " ")),), d,
                              "look-alike letters, spaced"))
    iban_carriers = ["wire it to {} today", "IBAN: {}", "Konto {} bitte", "{}"]
    for _ in range(5):
        v = iban(rng)
        own = [c for c in _number_cases(rng, "iban", v, [4] * 8, iban_carriers)
               if not c.evasion.startswith(("split", "digits from", "mixed scripts"))]
        cases += own
        cases.append(Case("iban", (f"IBAN {v.lower()}",), v, "lower case"))
        cases.append(Case("iban", (f"IBAN {grouped(v.lower(), [4] * 8, ' ')}",), v, "lower case printed"))
        cases.append(Case("iban", (f"wire it to {' '.join(v)} today",), v, "spelled out"))
        for word in ("x", " x ", " and "):
            cases.append(Case("iban", (f"IBAN {grouped(v, [4] * 8, word)} ok",), v, f"{word!r} between groups"))
    for _ in range(8):
        v = email(rng)
        local, domain = v.split("@")
        dom_words = domain.replace(".", " dot ")
        forms = {
            "plain": v, "(at)": f"{local}(at){domain}", "[at]": f"{local}[at]{domain}",
            "{at}": f"{local}{{at}}{domain}", "<at>": f"{local}<at>{domain}", "spaced (at)": f"{local} (at) {domain}",
            "AT upper": f"{local} [AT] {domain}", "(at) and (dot)": f"{local}(at){domain.replace('.', '(dot)')}",
            "[at] and [dot]": f"{local} [at] {domain.replace('.', ' [dot] ')}",
            "at and dot words": f"{local} at {dom_words}", "fullwidth @": f"{local}\uff20{domain}",
            "small @": f"{local}\ufe6b{domain}", "fullwidth address": fullwidth(v),
            "zero-width in local": local[:2] + "\u200b" + local[2:] + "@" + domain,
            "zero-width in domain": f"{local}@{domain[:3]}\u200d{domain[3:]}",
            "zero-width around @": f"{local}\u2060@\u2060{domain}",
            "ideographic full stop": local + "@" + domain.replace(".", "\u3002"),
            "fullwidth dot": local + "@" + domain.replace(".", "\uff0e"),
            "upper case": v.upper(), "soft hyphen": f"{local}\u00ad@{domain}",
            "defanged [.]": f"{local}@{domain.replace('.', '[.]')}",
            "defanged [@] and (.)": f"{local}[@]{domain.replace('.', '(.)')}",
            "HTML &#64;": f"{local}&#64;{domain}", "HTML &commat; and &#x2e;": f"{local}&commat;{domain.replace('.', '&#x2e;')}",
            "escape \\u0040": f"{local}\\u0040{domain}", "escape \\x40": f"{local}\\x40{domain}",
            "quoted local part": f'"{local}"@{domain}', "put together in code": f'"{local}" + "@" + "{domain}"',
            "spelled out": " ".join(v), "spelled out, after a word": "to " + " ".join(v),
            "Cyrillic look-alikes": v.replace("a", "\u0430").replace("e", "\u0435").replace("o", "\u043e"),
            "spaced @": f"{local} @ {domain}", "spaced @ and dots": f"{local} @ {domain.replace('.', ' . ')}",
            "-at- and -dot-": f"{local}-at-{domain.replace('.', '-dot-')}",
            "spaced -at- and -dot-": f"{local} -at- {domain.replace('.', ' -dot- ')}",
            "-at- and (dot)": f"{local}-at-{domain.replace('.', '(dot)')}",
            "comment before @": f"{local}(work)@{domain}", "comment after @": f"{local}@(hq){domain}",
            "arroba and punto": f"{local} arroba {domain.replace('.', ' punto ')}",
            "(arroba)": f"{local} (arroba) {domain}",
            "sign glued to @": f"{local}!@{domain}", "dot glued to @": f"{local}.@{domain}",
            "signs glued to @": f"{local}**@{domain}", "currency sign glued to @": f"{local}\u20ac@{domain}",
        }
        for name, enc in encodings(f"mail {v} now").items():
            forms[name] = f"blob {enc}"
        forms["%40"] = f"{local}%40{domain}"
        for name, text in forms.items():
            cases.append(Case("email", (f"Please write to {text} about it.",), v.lower(), name))
        long = f"{'x' * (60 - len(local))}.{local}@{domain}"  # longer than an output stream's hold-back
        cases.append(Case("email", (f"Please write to {long} about it.",), long.lower(), "long address"))
    for _ in range(4):
        v = phone(rng)
        for name, text in {"plain": v, "fullwidth": fullwidth(v),
                           "arabic-indic": digits_in(v, 0x0660), "zero-width": v.replace(" ", " \u200b"),
                           "nbsp": v.replace(" ", "\u00a0"), "base64": base64.b64encode(f"call {v}".encode()).decode(),
                           "in words": in_words(v), "no separators": re.sub(r"[^0-9+]", "", v)}.items():
            cases.append(Case("phone", (f"call me on {text} tomorrow",), re.sub(r"\D", "", v), name))
    return cases


# -- benign lines --------------------------------------------------------------------------

WORDS = ("the report shows revenue growth in all regions while costs stayed flat and the team plans "
         "to hire two engineers next quarter after the migration finishes on schedule with no incidents "
         "customers asked about pricing support hours and the new export feature which ships in march").split()


def _uuid(rng: random.Random) -> str:
    h = "".join(rng.choice("0123456789abcdef") for _ in range(32))
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{rng.choice('89ab')}{h[17:20]}-{h[20:]}"


def _ts(rng: random.Random) -> str:
    y, mo, d = rng.randint(2019, 2027), rng.randint(1, 12), rng.randint(1, 28)
    h, mi, s, ms = rng.randint(0, 23), rng.randint(0, 59), rng.randint(0, 59), rng.randint(0, 999999)
    return rng.choice([
        f"{y}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}Z", f"{y}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d}.{ms:06d}",
        f"{d:02d}/{mo:02d}/{y} {h:02d}:{mi:02d}", f"{mo}/{d}/{y}", f"{d:02d}.{mo:02d}.{y} {h:02d}:{mi:02d}:{s:02d}",
        str(rng.randint(1_500_000_000, 1_900_000_000)), str(rng.randint(1_500_000_000_000, 1_900_000_000_000)),
        str(rng.randint(1_500_000_000_000_000, 1_900_000_000_000_000)),
        str(rng.randint(1_500_000_000_000_000_000, 1_900_000_000_000_000_000)),
        f"{y}{mo:02d}{d:02d}{h:02d}{mi:02d}{s:02d}", f"{y}-{mo:02d}-{d:02d} {h:02d}:{mi:02d}:{s:02d},{ms // 1000:03d}",
    ])


def _digits(rng: random.Random, n: int) -> str:
    return str(rng.randint(1, 9)) + "".join(rng.choice(string.digits) for _ in range(n - 1))


def _order(rng: random.Random) -> str:
    return rng.choice([
        f"{_digits(rng, 3)}-{_digits(rng, 7)}-{_digits(rng, 7)}", f"ORD-{rng.randint(2019, 2027)}-{_digits(rng, 6)}",
        f"#{_digits(rng, 9)}", f"INV-{_digits(rng, 8)}", f"PO {_digits(rng, 10)}", f"order {_digits(rng, 12)}",
        f"SO{_digits(rng, 10)}", f"{_digits(rng, 4)}-{_digits(rng, 4)}-{_digits(rng, 4)}",
    ])


def _tracking(rng: random.Random) -> str:
    return rng.choice([
        "1Z" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16)),
        _digits(rng, 12), "9400 " + " ".join(_digits(rng, 4) for _ in range(4)) + " " + _digits(rng, 2),
        _digits(rng, 10), "JD" + _digits(rng, 18), f"{_digits(rng, 4)} {_digits(rng, 4)} {_digits(rng, 4)}",
        "LX" + _digits(rng, 9) + "DE", _digits(rng, 22),
    ])


CODE = [
    "for (int i = 0; i < {n}; i++) {{ buf[i] = 0x{h}; }}", "const MAX_RETRIES = {n}; // backoff {m} ms",
    "if resp.status_code == 429: time.sleep({m} / 1000)", "SELECT id, total FROM orders WHERE id > {n} LIMIT 100;",
    "assert checksum(data) == 0x{h}", "timeout := {m} * time.Millisecond", "x = np.zeros(({n}, {m}), dtype=np.float32)",
    "git checkout {sha}", "docker pull registry.example.com/app@sha256:{sha64}", "let port = {m}; let host = \"localhost\";",
    "return hash64({n}) ^ 0x{h}{h}", "CREATE INDEX idx_{n} ON events (created_at);", "#define BUFFER_SIZE {m}",
    "matrix[{n}][{m}] = {n}.{m};", "version = \"{a}.{b}.{c}\"", "chmod 0644 /var/lib/app/{n}.db",
]
LOGS = [
    "{ts} INFO request_id={uuid} path=/v1/chat/completions status=200 duration_ms={m}",
    "{ts} WARN retrying upstream attempt={a} backoff_ms={m} trace={sha}",
    "{ts} ERROR job={n} failed after {m} ms: connection reset by peer",
    "[{ts}] GET /api/orders/{n} 200 {m}b {a}.{b}ms", "{ts} DEBUG cache hit key=user:{n}:profile ttl={m}",
    "{ts} span_id={h}{h} parent={h}{h} took {m}us", "pid={m} rss={n} kB threads={a}",
    "{ts} INFO exported rows={n} bytes={n}{m} elapsed_ms={m}",
]
HYPHENATED = ("stay-at-home", "look-at-me", "dot-com", "at-risk", "state-of-the-art", "pay-at-the-door",
              "work-at-home.com", "eat-at-joes", "dot-matrix", "at-a-glance", "point-at-dot-notation",
              "stay-at-home-dot-mom", "sit-at-desk-dot-jpg", "hit-at-dot-com", "made-at-home", "arrive-at-noon")
PROSE = [
    "{w} {w} {w} {n} {w} {w} {w}.", "In {year} we shipped {a} releases and closed {m} tickets.",
    "The meeting is at {a}:{b:02d} in room {m}; bring the {w} notes.", "Revenue grew {a}.{b}% to ${n},{m:03d} this quarter.",
    "Please review order {order} and tracking {tracking} before friday.", "Call the {w} team about {w} {w} at {a} pm.",
    "Invoice {order} totals {m}.{b:02d} EUR, due in {a} days.", "Section {a}.{b}.{c} of the runbook covers {w} {w}.",
    "The UUID {uuid} belongs to the {w} job.", "Timestamp {ts} is when the {w} started.",
    "Ship to warehouse {a}, dock {b}; parcel {tracking}.", "ISBN 978-{a}-{m}-{n}-{c} is the {w} book.",
    "Look at example.com for the {w} docs, meet at {a} pm.", "Reach the team at the office or on chat, not by mail.",
    "Build {n} passed {m} of {m} tests in {a}.{b} s.", "Coordinates {a}.{m}, {b}.{m} mark the {w} site.",
    "Encoded config: {b64}", "Our fax machine broke in {year}; {w} {w}.", "Order {order}, {a} items, {tracking}.",
]


def benign() -> list[str]:
    rng = random.Random(SEED + 1)
    out: list[str] = []

    def fill(t: str) -> str:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        return t.format(
            n=rng.randint(0, 10**rng.randint(1, 9)), m=rng.randint(0, 99999), a=rng.randint(0, 20),
            b=rng.randint(0, 59), c=rng.randint(0, 9), h="".join(rng.choice("0123456789abcdef") for _ in range(8)),
            sha="".join(rng.choice("0123456789abcdef") for _ in range(40)),
            sha64="".join(rng.choice("0123456789abcdef") for _ in range(64)), uuid=_uuid(rng), ts=_ts(rng),
            w=rng.choice(WORDS), year=rng.randint(1990, 2030), order=_order(rng), tracking=_tracking(rng),
            b64=base64.b64encode(sentence.encode()).decode())

    for templates, count in ((PROSE, 900), (CODE, 500), (LOGS, 500)):
        for _ in range(count):
            out.append(fill(rng.choice(templates)))
    for _ in range(150):
        out.append(" ".join([_uuid(rng), _ts(rng), _order(rng), _tracking(rng)]))
    for _ in range(100):  # bare numbers of every length with no context
        out.append(f"id {_digits(rng, rng.randint(5, 22))}")
    for _ in range(100):  # hyphenated English, `-at-` and `-dot-` in it (written-out e-mails use them)
        out.append(f"The {rng.choice(HYPHENATED)} {rng.choice(WORDS)} and the {rng.choice(HYPHENATED)} {rng.choice(WORDS)}.")
    return out


# -- leak check ----------------------------------------------------------------------------

def fold(text: str) -> str:
    """NFKC, format characters removed, Unicode digits to ASCII, lower case."""
    text = "".join(c for c in unicodedata.normalize("NFKC", text) if unicodedata.category(c) != "Cf")
    text = text.replace("\u3002", ".")  # the ideographic full stop: a dot in addresses
    text = text.translate({0x0430: "a", 0x0435: "e", 0x043E: "o"})  # Cyrillic look-alikes
    return "".join(str(unicodedata.decimal(c)) if c.isdecimal() else c for c in text).lower()


_B64_RUN = re.compile(r"[A-Za-z0-9+/_\-]{8,}={0,2}")
_HEX_RUN = re.compile(r"(?:[0-9a-fA-F]{2}){6,}")


def decoded_forms(text: str) -> list[str]:
    escapes = re.sub(r"\\(?:u([0-9a-fA-F]{4})|x([0-9a-fA-F]{2}))", lambda m: chr(int(m.group(1) or m.group(2), 16)), text)
    out = [text, urllib.parse.unquote_plus(text), html.unescape(text), escapes]
    for level in range(2):
        more = []
        for t in out:
            for m in _B64_RUN.finditer(t):
                run = m.group()
                for fn in (base64.b64decode, base64.urlsafe_b64decode):
                    try:
                        more.append(fn(run + "=" * (-len(run) % 4)).decode("utf-8", "ignore"))
                    except Exception:  # noqa: BLE001 - not base64: nothing to add
                        pass
            for m in _HEX_RUN.finditer(t):
                more.append(bytes.fromhex(m.group()).decode("utf-8", "ignore"))
        out += more
    return out


def forms(text: str) -> list[str]:
    """Every form a seeded value could hide in within `text`: folded, without separators or
    spaces, digits only (also of digits read out in words), with written-out `at`/`dot` resolved
    and comments and signs by the `@` dropped, tags shown as nothing; of the text and of what it decodes
    to."""
    out = []
    for form in decoded_forms(text):
        f = fold(form)
        words = re.sub(r"\s*[(\[{<]\s*(at|arroba|dot|punto|@|\.)\s*[)\]}>]\s*",
                       lambda m: "@" if m.group(1) in ("at", "arroba", "@") else ".", f)
        words = re.sub(r"\s+(?:at|arroba)\s+", "@", re.sub(r"\s+(?:dot|punto)\s+", ".", words))
        words = re.sub(r"\s*-\s*at\s*-\s*", "@", re.sub(r"\s*-\s*dot\s*-\s*", ".", words))
        words = re.sub(r"\([^()@]*\)(?=@)|(?<=@)\([^()@]*\)", "", words)  # a comment by the `@`
        words = re.sub(r"[!#$&*,:;=?^`|~.\u20ac\u00a7\u00b6]+(?=@)", "", words)  # signs glued to it
        spoken = re.sub(r"\b(?:zero|oh|one|two|three|four|five|six|seven|eight|nine)\b",
                        lambda m: str(_WORDS.index(m.group()) if m.group() != "oh" else 0), f)
        shown = re.sub(r"<[^<>]*>", "", f)  # as a renderer shows it: every tag as nothing
        looks = re.sub(r"(?<=[0-9olisb|])[olisb|]|[olisb|](?=[0-9olisb|])",
                       lambda m: {"o": "0", "s": "5", "b": "8"}.get(m.group(), "1"), f)
        out += [f, re.sub(r"[\s.\-/_]", "", f), re.sub(r"\s", "", f), re.sub(r"[\s\"'+]", "", f), words,
                "\x00" + re.sub(r"\D", "", f),
                "\x00" + re.sub(r"\D", "", spoken), "\x00" + re.sub(r"\D", "", shown),
                "\x00" + re.sub(r"\D", "", looks)]
    return out


def leaks_in(found: list[str], canonical: str) -> bool:
    """`leaks` over the `forms` of a text computed once (many values against one text)."""
    target = canonical.lower()
    digits = re.sub(r"\D", "", canonical)
    for f in found:
        if f.startswith("\x00"):  # digits-only forms
            if len(digits) >= 9 and digits in f:
                return True
        elif target in f:
            return True
    return False


def leaks(text: str, canonical: str) -> bool:
    """Whether `text` still holds the value: as written, digits only, folded, or decoded."""
    return leaks_in(forms(text), canonical)
