"""AWS event-stream framing (application/vnd.amazon.eventstream), as Bedrock's
ConverseStream sends it: prelude (total length, headers length, CRC32), headers, payload,
message CRC32. `Decoder` reassembles messages across arbitrary chunk boundaries."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

_PRELUDE = struct.Struct(">II")
# Bounds a corrupt or hostile length field instead of buffering forever.
MAX_MESSAGE_BYTES = 16 << 20


class EventStreamError(ValueError):
    """The bytes are not valid event-stream framing."""


def encode(headers: dict[str, str], payload: bytes) -> bytes:
    """One message with string-valued headers (type 7), as AWS services send them."""
    raw_headers = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
        for k, v in headers.items())
    total = 12 + len(raw_headers) + len(payload) + 4
    prelude = _PRELUDE.pack(total, len(raw_headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + raw_headers + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _headers(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(raw):
        name_len = raw[i]
        name = raw[i + 1:i + 1 + name_len].decode()
        i += 1 + name_len
        kind = raw[i]
        i += 1
        if kind == 7 or kind == 6:  # string, bytes
            (n,) = struct.unpack_from(">H", raw, i)
            value = raw[i + 2:i + 2 + n]
            out[name] = value.decode("utf-8", "replace")
            i += 2 + n
        elif kind in (0, 1):  # bool true/false
            out[name] = "true" if kind == 0 else "false"
        else:
            size = {2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}.get(kind)
            if size is None:
                raise EventStreamError(f"unknown header type {kind}")
            out[name] = raw[i:i + size].hex()
            i += size
    return out


class Decoder:
    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> Iterator[tuple[dict[str, str], bytes]]:
        """Yields (headers, payload) for every complete message so far."""
        self._buf += chunk
        while len(self._buf) >= 12:
            total, headers_len = _PRELUDE.unpack_from(self._buf)
            if total > MAX_MESSAGE_BYTES or total < 16 or headers_len > total - 16:
                raise EventStreamError(f"bad message length {total}")
            if zlib.crc32(self._buf[:8]) != struct.unpack_from(">I", self._buf, 8)[0]:
                raise EventStreamError("prelude CRC mismatch")
            if len(self._buf) < total:
                return
            message, self._buf = self._buf[:total], self._buf[total:]
            if zlib.crc32(message[:-4]) != struct.unpack_from(">I", message, total - 4)[0]:
                raise EventStreamError("message CRC mismatch")
            yield _headers(message[12:12 + headers_len]), message[12 + headers_len:total - 4]

    @property
    def pending(self) -> int:
        return len(self._buf)
