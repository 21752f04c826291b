"""gateway_extproc.pdf.pages: never fewer pages than a real parser (pdfium, as pypdfium2)
finds, read from the raw bytes and from object streams, and None (the caller then assumes
the most pages a provider accepts) where it cannot tell."""

from __future__ import annotations

import base64
import io
import time
import tracemalloc
import zlib
from collections.abc import Callable

import pypdf
import pypdfium2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_extproc import pdf

from .pdf_files import build


def pdfium_pages(data: bytes) -> int | None:
    """The pages pdfium finds, or None when it cannot open the file."""
    try:
        return len(pypdfium2.PdfDocument(data))
    except pypdfium2.PdfiumError:
        return None


@pytest.mark.parametrize("object_stream", [False, True], ids=["plain", "object-stream"])
@pytest.mark.parametrize("typed", [True, False], ids=["typed", "untyped"])
@pytest.mark.parametrize("n", [1, 2, 37, 500])
def test_counts_the_pages_a_parser_finds(n: int, object_stream: bool, typed: bool) -> None:
    data = build(n, object_stream=object_stream, typed=typed)
    assert pdfium_pages(data) == n
    assert pdf.pages(data) == n


def test_a_short_pdf_of_many_pages_is_counted_by_its_pages() -> None:
    """The attack: 500 empty pages in an object stream are 7 KB, a 100th of their bill."""
    data = build(500, object_stream=True)
    assert len(data) < 8000 and pdf.pages(data) == 500


def test_pdfs_written_by_pypdf() -> None:
    writer = pypdf.PdfWriter()
    for _ in range(12):
        writer.add_blank_page(612, 792)
    out = io.BytesIO()
    writer.write(out)
    assert pdf.pages(out.getvalue()) == 12


def test_encrypted_is_unknown() -> None:
    writer = pypdf.PdfWriter()
    for _ in range(3):
        writer.add_blank_page(612, 792)
    writer.encrypt("", "owner")  # opens without a password: a provider reads it
    out = io.BytesIO()
    writer.write(out)
    assert pdfium_pages(out.getvalue()) == 3
    assert pdf.pages(out.getvalue()) is None


@pytest.mark.parametrize("data", [b"", b"hello", b"\x89PNG\r\n\x1a\n" + bytes(100), bytes(range(256)) * 40,
                                  b"%PDF-1.7\n" + bytes(range(256)) * 40, b"%PDF-1.7\n%%EOF\n"])
def test_garbage_and_pdfs_without_a_page_tree_are_unknown(data: bytes) -> None:
    assert pdf.pages(data) is None


def test_truncated_counts_what_is_there_or_is_unknown() -> None:
    for data in (build(500), build(500, object_stream=True)):
        for cut in range(0, len(data), max(1, len(data) // 97)):
            found, parsed = pdf.pages(data[:cut]), pdfium_pages(data[:cut])
            assert not parsed or found is None or found >= parsed, cut


@pytest.mark.parametrize(("old", "new"), [
    (b"/Type /Page ", b"/Type /P#61ge "),  # a name with an escape is the same name
    (b"/Type /Page ", b"/T#79pe%c\n/Page "),  # a comment is white space
    (b"/Count 40", b"/C#6funt 40"),
])
def test_names_and_comments_are_read_as_a_parser_reads_them(old: bytes, new: bytes) -> None:
    data = build(40, object_stream=True).replace(b"/Kids", b"/Kidz")  # only /Count and /Type left
    plain = zlib.decompress(data[data.index(b"stream\n") + 7:])
    packed = zlib.compress(plain.replace(old, new))
    head = data[:data.index(b"stream\n") + 7]
    head = head.replace(b"/Length %d" % len(zlib.compress(plain, 9)), b"/Length %d" % len(packed))
    tampered = head + packed + b"\nendstream\nendobj\n"
    assert pdf.pages(tampered) == 40


def _reencoded(data: bytes, filters: bytes, encode: Callable[[bytes], bytes]) -> bytes:
    """`data`'s object stream with its objects encoded by `encode` under `filters`."""
    start = data.index(b"stream\n") + 7
    end = data.index(b"\nendstream", start)
    plain = encode(zlib.decompress(data[start:end]))
    return (data[:start].replace(b"/Filter /FlateDecode", filters) + plain + data[end:])


@pytest.mark.parametrize(("filters", "encode"), [
    (b"/Filter /ASCIIHexDecode", lambda b: b.hex().encode() + b">"),
    (b"/Filter /AHx", lambda b: b.hex().encode() + b">"),
    (b"/Filter [/FlateDecode /ASCIIHexDecode]", lambda b: zlib.compress(b.hex().encode() + b">")),
    (b"/Filter [/ASCII85Decode /FlateDecode]", lambda b: base64.a85encode(zlib.compress(b), adobe=True)[2:]),
    (b"/Filter /FlateDecode /DecodeParms << /Predictor 2 /Columns 1 >>", zlib.compress),
    (b"/Filter 9 0 R", zlib.compress),
    (b"/Filter /FlateDecode", lambda b: b"\x00" + zlib.compress(b)),  # not zlib data
])
def test_object_streams_this_cannot_read_are_unknown(filters: bytes, encode: Callable[[bytes], bytes]) -> None:
    data = _reencoded(build(30, object_stream=True, decoy=True), filters, encode)
    assert pdf.pages(data) is None


def test_an_uncompressed_object_stream_is_read_with_the_file() -> None:
    data = _reencoded(build(30, object_stream=True, decoy=True), b"", lambda b: b)
    assert pdfium_pages(data) == 30 and pdf.pages(data) == 31


def test_an_object_stream_without_type_is_read() -> None:
    data = build(30, object_stream=True).replace(b"/Count 30", b"/Count 1 ").replace(b"/Type /ObjStm", b"/Tpye /ObjStx")
    assert b"/Count 1 " not in data  # (inside the compressed stream: untouched)
    assert pdf.pages(data) == 30


@pytest.mark.parametrize(("old", "new"), [(b"/Count 9", b"/Count 12 0 R"), (b"/Kids [", b"/Kids 12 0 R [")])
def test_a_count_or_kids_by_reference_is_unknown(old: bytes, new: bytes) -> None:
    assert pdf.pages(build(9).replace(old, new)) is None


def test_a_decompression_bomb_costs_bounded_time_and_memory() -> None:
    """An object stream that inflates to 256 MiB of zeros: given up at the bound."""
    packer = zlib.compressobj(9)
    zeros = bytes(1 << 20)
    packed = b"".join(packer.compress(zeros) for _ in range(256)) + packer.flush()
    data = (b"%PDF-1.7\n1 0 obj\n<< /Type /ObjStm /N 1 /First 4 /Filter /FlateDecode >>\nstream\n" + packed
            + b"\nendstream\nendobj\n2 0 obj\n<< /Type /Pages /Kids [] /Count 1 >>\nendobj\n")
    tracemalloc.start()
    started = time.monotonic()
    try:
        assert pdf.pages(data) is None
        elapsed, peak = time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * (pdf.INFLATE_FLOOR + pdf.INFLATE_RATIO * len(data)) < 3 * pdf.INFLATE_CEILING
    assert elapsed < 2


pdfs = st.builds(build, st.integers(1, 60), object_stream=st.booleans(), typed=st.booleans(),
                 size=st.integers(0, 2000))


@settings(max_examples=60, deadline=None)
@given(pdfs)
def test_never_fewer_pages_than_pdfium(data: bytes) -> None:
    assert pdf.pages(data) == pdfium_pages(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pdfs, st.lists(st.tuples(st.floats(0, 1), st.binary(min_size=0, max_size=4)), min_size=1, max_size=4))
def test_damaged_pdfs_never_count_fewer_pages_than_pdfium(data: bytes, edits: list[tuple[float, bytes]]) -> None:
    """Bytes overwritten anywhere (pdfium repairs what it can): unknown, or at least its count."""
    damaged = bytearray(data)
    for where, patch in edits:
        at = int(where * len(damaged))
        damaged[at:at + len(patch)] = patch
    parsed = pdfium_pages(bytes(damaged))
    found = pdf.pages(bytes(damaged))
    assert not parsed or found is None or found >= parsed


@pytest.mark.parametrize("data", [
    pytest.param(b"/Type " + b"%" * 400_000 + b" X", id="a run of comment signs"),
    pytest.param(b"/Type" + b" %\n" * 300_000 + b"/Pages", id="comments and white space"),
    pytest.param(b"/Kids [" * 150_000 + b"1 0 R " * 20_000, id="unclosed arrays"),
    pytest.param(b"/Kids [" + b"1 " * 500_000, id="numbers without R"),
    pytest.param(b"/Count " * 150_000, id="counts without numbers"),
    pytest.param(b"/" + b"a#" * 500_000, id="a name of broken escapes"),
    pytest.param(b"/a#41" * 200_000, id="many escaped names"),
    pytest.param(b"1 0 obj << /First 1 /Filter /FlateDecode >> stream\n" * 20_000, id="empty object streams"),
    pytest.param(b"stream\n" * 150_000 + b"<< /ObjStm /Filter /FlateDecode >>", id="stream keywords"),
    pytest.param(b"/First " + b"stream " * 1_500_000, id="10 MB of object streams to try"),
    pytest.param(b"/First " + b"x stream endstream " * 500_000, id="10 MB of streams that end"),
])
def test_hostile_bytes_cost_linear_time(data: bytes) -> None:
    """1-10 MB each: a backtracking pattern took 7 s for 26 `%` and 68 s for 260 KB of
    unclosed `/Kids [` before the patterns were made possessive, and 1.5 million `stream`
    keywords to try 6 s before their number was bounded."""
    started = time.monotonic()
    pdf.pages(b"%PDF-1.7\n" + data)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(("stream_dict", "eol"), [
    pytest.param(b"", b" \n", id="spaces before the end of line"),
    pytest.param(b"", b"\r", id="CR"),
    pytest.param(b"", b"", id="no end of line"),
    pytest.param(b"/X /obj ", b"\n", id="a name with obj"),
    pytest.param(b"/X (1 0 obj) ", b"\n", id="a string with obj"),
    pytest.param(b"%1 0 obj\n", b"\n", id="a comment with obj"),
    pytest.param(b"/X (endstream) ", b"\n", id="a string with endstream"),
    pytest.param(b"/X (stream) (endstream) ", b"\n", id="a string with stream and endstream"),
    pytest.param(b"/X (stream\n) (endstream\n) ", b"\n", id="the same with line ends"),
    pytest.param(b"/DecodeParms << /Predictor 12 /Columns 4 >> ", b"\n", id="a predictor"),
])
def test_an_object_stream_dressed_to_hide_is_still_read(stream_dict: bytes, eol: bytes) -> None:
    """With a one-page decoy tree in the file's bytes, pages hidden in an object stream the
    reader passed over counted 1 (pdfium: 40): the dictionary was the bytes after its last
    `obj`, and the data had to start after a bare end of line."""
    data = build(40, object_stream=True, decoy=True, stream_dict=stream_dict, eol=eol)
    parsed, found = pdfium_pages(data), pdf.pages(data)
    assert found is None or found >= (parsed or 0) and found >= 40
