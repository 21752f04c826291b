"""PDFs written by hand for tests: a flat page tree of empty pages, its dictionaries in the
file or in a Flate object stream (PDF 1.5, with a cross-reference stream), padded to a size.
pdfium (pypdfium2) opens every variant, so a test can check a count against a real parser."""

from __future__ import annotations

import zlib


def build(pages: int, *, object_stream: bool = False, typed: bool = True, size: int = 0) -> bytes:
    """A PDF of `pages` empty US Letter pages. `typed=False` leaves `/Type` off the page
    dictionaries (pdfium takes a kid without `/Kids` as a page). `size`: padded with a
    comment after the header to at least this many bytes in all."""
    if size:
        return _build(pages, object_stream, typed, size - len(_build(pages, object_stream, typed, 0)))
    return _build(pages, object_stream, typed, 0)


def _build(pages: int, object_stream: bool, typed: bool, pad: int) -> bytes:
    kind = b"/Type /Page " if typed else b""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
               + b"] /Count %d /MediaBox [0 0 612 792] >>" % pages]
    objects += [b"<< " + kind + b"/Parent 2 0 R >>"] * pages
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    if pad > 0:
        out += b"%" + b"x" * max(0, pad - 2) + b"\n"
    if not object_stream:
        offsets = []
        for number, body in enumerate(objects, 1):
            offsets.append(len(out))
            out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
        xref = len(out)
        out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
        out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
        out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
        return bytes(out)
    header, content = [], bytearray()
    for number, body in enumerate(objects, 1):
        header.append(b"%d %d" % (number, len(content)))
        content += body + b"\n"
    first = b" ".join(header) + b"\n"
    packed = zlib.compress(first + content, 9)
    stream_number, xref_number = len(objects) + 1, len(objects) + 2
    stream_at = len(out)
    out += (b"%d 0 obj\n<< /Type /ObjStm /N %d /First %d /Filter /FlateDecode /Length %d >>\nstream\n"
            % (stream_number, len(objects), len(first), len(packed)) + packed + b"\nendstream\nendobj\n")
    xref_at = len(out)
    rows = [b"\x00" + (0).to_bytes(4, "big") + b"\xff\xff"]
    rows += [b"\x02" + stream_number.to_bytes(4, "big") + i.to_bytes(2, "big") for i in range(len(objects))]
    rows += [b"\x01" + stream_at.to_bytes(4, "big") + b"\x00\x00", b"\x01" + xref_at.to_bytes(4, "big") + b"\x00\x00"]
    table = b"".join(rows)
    out += (b"%d 0 obj\n<< /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n"
            % (xref_number, xref_number + 1, len(table)) + table + b"\nendstream\nendobj\n")
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)
