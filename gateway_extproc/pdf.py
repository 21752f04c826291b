"""How many pages a PDF sent inline may have, read from its bytes without a PDF library.

Providers bill an inline PDF as its extracted text plus an image of every page, so a PDF of
a few KB (500 empty pages compress to that) bills far more than its length: the budget
reserves by its page count (tokens.py). The count must never be below the pages a
provider's parser finds, and may be above (a reservation is settled down to the bill):

- the largest `/Count` (pdfium and pdf.js take the root's as the page count), the number
  of `/Type /Page` dictionaries, and the number of references in `/Kids` arrays (a page
  without `/Type` is still a page to pdfium and pdf.js, as a kid without `/Kids`):
  whichever is largest. Name trees have `/Kids` too and outlines a `/Count`, so a PDF with
  named destinations (LaTeX's hyperref) counts a few times its pages; telling those apart
  needs a parser, and any key that set them apart could be added to a page tree;
- read from the file's bytes and from its object streams (PDF 1.5 puts dictionaries in
  compressed `ObjStm` streams), inflated with a hard bound so a decompression bomb costs
  bounded CPU and memory;
- names written with `#xx` escapes (`/P#61ge` is `/Page`) and comments between a key and
  its value are read as a parser reads them.

None when it cannot tell: not a PDF, encrypted (`/Encrypt`: its object streams are
ciphertext), an object stream under another filter than Flate (or with a predictor, or
one that does not inflate within the bound), a `/Count` or `/Kids` given by reference, a
`/Kids` array of anything but references, or no page tree at all. Callers then assume
the most pages a provider accepts.
"""

from __future__ import annotations

import re
import zlib

# Inflated object streams, at most, per PDF: 1 MiB (500 empty pages are 50 KB) plus 20x
# its size (object streams are a part of a file, and text deflates 3-10x), never above
# 64 MiB. A zlib bomb (1,000x) is given up at that: ~0.1 s of CPU, twice that in memory.
INFLATE_FLOOR, INFLATE_RATIO, INFLATE_CEILING = 1 << 20, 20, 64 << 20
_CHUNK = 64 << 10  # compressed bytes fed to zlib at a time (what it leaves over is copied)
# Streams a PDF may hold, at most, before it is unknown: each costs a few microseconds here,
# and 100,000 are 30,000 pages' worth (providers read 1,000 at most), while `stream` written
# 1.5 million times in 10 MB took 6 s.
STREAMS_MAX = 100_000
# A PDF's header may be anywhere in its first 1,024 bytes (pdfium and pdf.js look there).
HEADER_WINDOW = 1024

# Every repetition is possessive (`*+`, `++`): a pattern that could backtrack over a run of
# `%` or an unclosed `[` took seconds for 30 bytes and minutes for 300 KB.
_WS = rb"(?:[\x00\t\n\x0c\r ]++|%[^\r\n]*+)*+"  # white space and comments
_REGULAR = rb"[^\x00\t\n\x0c\r ()<>\[\]{}/%]"  # a character that continues a name or number
_END = rb"(?!" + _REGULAR + rb")"  # the token ends here
_ESCAPED_NAME = re.compile(rb"/" + _REGULAR + rb"*#[0-9A-Fa-f]{2}" + _REGULAR + rb"*+")
_HEX = re.compile(rb"#([0-9A-Fa-f]{2})")
_REF = rb"\d++" + _WS + rb"\d++" + _WS + rb"R" + _END
# A /Kids array holds references only: anything else in it (or no `]`) is read as unknown
# rather than scanned past, which would hide the tokens after it.
_TOKENS = re.compile(  # (one literal first: re then skips to each `/` at C speed, ~1 GB/s)
    rb"/(?:Type" + _WS + rb"/Page" + _END
    + rb"|Count" + _WS + rb"(?P<count>[+]?\d++)(?P<count_ref>" + _WS + rb"\d++" + _WS + rb"R" + _END + rb")?"
    + rb"|Kids" + _WS + rb"(?:\[(?P<kids>[0-9R\x00\t\n\x0c\r ]*+)(?P<closed>\])?|(?P<kids_ref>" + _REF + rb"))"
    + rb"|(?P<encrypt>Encrypt" + _END + rb"))")
_REFS = re.compile(_REF)
# The data starts after the end of the line (pdfium also takes spaces before it).
_STREAM = re.compile(rb"stream[\x00\t\x0c ]*+(?:\r\n|\n|\r)?")
_OBJECT_STREAM = re.compile(rb"/ObjStm" + _END + rb"|/First" + _END)
# What makes an object stream's bytes unreadable here but not to a parser: a filter other
# than Flate that parsers decode (image filters leave the bytes as they are, read with the
# file's), or one given by reference, a predictor (a byte in every row), a Flate stream
# that is not zlib data.
_FLATE = re.compile(rb"/(?:FlateDecode|Fl)" + _END)
_UNREAD = re.compile(rb"/(?:ASCIIHexDecode|AHx|ASCII85Decode|A85|LZWDecode|LZW|RunLengthDecode|RL|Crypt"
                     rb"|DecodeParms|DP|Predictor)" + _END + rb"|/Filter" + _WS + _REF)


class _Unknown(Exception):
    """The page count cannot be told from these bytes."""


def pages(data: bytes) -> int | None:
    """The most pages a parser may find in `data`, or None when it cannot be told (see the
    module docstring). A few passes over the bytes plus the bounded inflation."""
    if b"%PDF" not in data[:HEADER_WINDOW]:
        return None
    budget = [min(INFLATE_CEILING, INFLATE_FLOOR + INFLATE_RATIO * len(data))]
    try:
        largest, typed, kids = _count(data)
        for stream in _object_streams(data, budget):
            more = _count(stream)
            largest, typed, kids = max(largest, more[0]), typed + more[1], kids + more[2]
    except _Unknown:
        return None
    return max(largest, typed, kids) or None


def _names(text: bytes) -> bytes:
    """`text` with `#xx` escapes in names decoded, as a parser reads them."""
    if b"#" not in text:
        return text
    return _ESCAPED_NAME.sub(lambda m: _HEX.sub(lambda h: bytes.fromhex(h[1].decode()), m[0]), text)


def _count(text: bytes) -> tuple[int, int, int]:
    """(largest /Count, /Type /Page dictionaries, references in /Kids arrays) in `text`."""
    largest = typed = kids = 0
    for match in _TOKENS.finditer(_names(text)):
        if match["encrypt"] or match["count_ref"] or match["kids_ref"] or (match["kids"] is not None
                                                                          and not match["closed"]):
            raise _Unknown
        if match["count"] is not None:
            largest = max(largest, int(match["count"]))
        elif match["kids"] is not None:
            kids += len(_REFS.findall(match["kids"]))
        else:
            typed += 1
    return largest, typed, kids


def _object_streams(data: bytes, budget: list[int]) -> list[bytes]:
    """The inflated contents of every object stream, within `budget` bytes in all.

    A stream is taken for one when the bytes since the last stream ended name `/ObjStm` or
    `/First` (pdf.js reads one without its `/Type`). Not the bytes since its `obj` keyword:
    `obj` or `stream` in a string or name inside the dictionary (`/X (obj)`) would cut the
    marker off; and an `endstream` ends a stream only after one that was read (a string
    `(stream) (endstream)` in the dictionary is no end). So a stream after an outline item
    (`/First`) is tried too: inflated if it is zlib data, else passed over, unless it is
    encoded in a way a parser decodes and this does not (another filter, a predictor),
    or a filter given by reference, which is unknown. One pass; each byte is read once."""
    out = []
    view = memoryview(data)
    marked = flate = unread = inside = False
    since = 0
    for seen, match in enumerate(_STREAM.finditer(data)):
        if seen == 2 * STREAMS_MAX:  # (`stream` and `endstream`)
            raise _Unknown
        start = match.start()
        if data[start - 1:start].isalpha():
            if inside and data[start - 3:start] == b"end":  # its data was no dictionary
                marked = flate = unread = inside = False
                since = match.end()
            continue
        head, since = _names(data[since:start]), match.end()
        marked = marked or _OBJECT_STREAM.search(head) is not None
        flate = flate or _FLATE.search(head) is not None
        unread = unread or _UNREAD.search(head) is not None
        if not marked:
            inside = True
            continue
        if unread:
            raise _Unknown
        inflated = _inflate(view, match.end(), budget)
        if inflated is None and flate:
            raise _Unknown
        if inflated is not None:
            out.append(inflated)
            inside = True
    return out


def _inflate(view: memoryview, at: int, budget: list[int]) -> bytes | None:
    """The zlib stream starting at `at`, inflated while `budget` lasts (raises past it);
    None when the bytes there are not zlib data. A stream damaged midway gives what came
    before the damage, as parsers decode it."""
    inflater = zlib.decompressobj()
    parts = []
    try:
        while not inflater.eof and at < len(view):
            piece = inflater.decompress(view[at:at + _CHUNK], budget[0] + 1)
            at += _CHUNK
            budget[0] -= len(piece)
            if budget[0] < 0 or inflater.unconsumed_tail:
                raise _Unknown
            parts.append(piece)
    except zlib.error:
        if not parts:
            return None
    return b"".join(parts)
