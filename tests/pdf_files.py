"""PDFs written by hand for tests: a flat page tree of empty pages, its dictionaries in the
file or in a Flate object stream (PDF 1.5, with a cross-reference stream), padded to a size.
pdfium (pypdfium2) opens every variant, so a test can check a count against a real parser."""

from __future__ import annotations

import zlib


def build(pages: int, *, object_stream: bool = False, typed: bool = True, size: int = 0, decoy: bool = False,
          stream_dict: bytes = b"", eol: bytes = b"\n") -> bytes:
    """A PDF of `pages` empty US Letter pages. `typed=False` leaves `/Type` off the page
    dictionaries (pdfium takes a kid without `/Kids` as a page). `size`: padded with a
    comment after the header to at least this many bytes in all. `decoy`: a one-page tree
    in the file's bytes that nothing points at. `stream_dict`: more of the object stream's
    dictionary; `eol`: what follows its `stream` keyword."""
    def made(pad: int) -> bytes:
        return _build(pages, object_stream, typed, pad, decoy, stream_dict, eol)
    return made(size - len(made(0)) if size else 0)


def _build(pages: int, object_stream: bool, typed: bool, pad: int, decoy: bool, stream_dict: bytes,
           eol: bytes) -> bytes:
    kind = b"/Type /Page " if typed else b""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
               + b"] /Count %d /MediaBox [0 0 612 792] >>" % pages]
    objects += [b"<< " + kind + b"/Parent 2 0 R >>"] * pages
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    if pad > 0:
        out += b"%" + b"x" * max(0, pad - 2) + b"\n"
    if decoy:  # objects numbered past the real ones, listed in no cross-reference
        out += b"900 0 obj\n<< /Type /Pages /Kids [901 0 R] /Count 1 >>\nendobj\n"
        out += b"901 0 obj\n<< /Type /Page /Parent 900 0 R >>\nendobj\n"
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
    out += (b"%d 0 obj\n<< /Type /ObjStm /N %d /First %d /Filter /FlateDecode /Length %d %s>>\nstream%s"
            % (stream_number, len(objects), len(first), len(packed), stream_dict, eol)
            + packed + b"\nendstream\nendobj\n")
    xref_at = len(out)
    rows = [b"\x00" + (0).to_bytes(4, "big") + b"\xff\xff"]
    rows += [b"\x02" + stream_number.to_bytes(4, "big") + i.to_bytes(2, "big") for i in range(len(objects))]
    rows += [b"\x01" + stream_at.to_bytes(4, "big") + b"\x00\x00", b"\x01" + xref_at.to_bytes(4, "big") + b"\x00\x00"]
    table = b"".join(rows)
    out += (b"%d 0 obj\n<< /Type /XRef /Size %d /W [1 4 2] /Root 1 0 R /Length %d >>\nstream\n"
            % (xref_number, xref_number + 1, len(table)) + table + b"\nendstream\nendobj\n")
    out += b"startxref\n%d\n%%%%EOF\n" % xref_at
    return bytes(out)
