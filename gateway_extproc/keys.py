"""Virtual API keys: format, hashing, verification.

A key reads `gwk_<id>_<secret>`. The id is not secret: it finds the config entry in O(1)
and is what logs show. An id is 1-63 lowercase letters, digits and '-' (`ID`, checked for
values and the admin API alike), so a presented "id" of any other form cannot be a key and
is refused before any lookup: a caller cannot make the key store look up, or a worker cache,
strings of its choosing (up to Envoy's 60 KiB header limit each). Only the SHA-256 of the whole key is stored, and the presented
key's hash is compared in constant time, so neither the store nor timing leaks a key.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "gwk_"
ID = re.compile(r"\A[a-z0-9][a-z0-9-]{0,62}\Z")  # \Z: `$` also matched before a final newline
# Compared against when the id is unknown, so unknown ids cost the same as wrong secrets.
DUMMY = hashlib.sha256(b"gateway-extproc-dummy").hexdigest()


# HTTP's whitespace (RFC 9110 OWS). str.strip() would also take Unicode spaces off a key.
OWS = " \t"


def bearer(authorization: str | None) -> str | None:
    """The credential of an `Authorization: Bearer <credential>` value (the scheme in any case,
    then spaces or tabs), else None. Only SP and HTAB surround it: a NBSP or ideographic
    space pasted with a key is part of what was sent, as it is in `x-api-key`."""
    scheme, _, value = (authorization or "").partition(" ")
    value = value.strip(OWS)
    return value if scheme.lower() == "bearer" and value else None


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    if not key.startswith(PREFIX):
        return None
    id_, sep, secret = key[len(PREFIX):].partition("_")
    return id_ if sep and secret and ID.fullmatch(id_) else None


def matches(key: str, stored_sha256: str | None) -> bool:
    return hmac.compare_digest(digest(key), stored_sha256 or DUMMY) and stored_sha256 is not None


def generate(id_: str) -> str:
    return f"{PREFIX}{id_}_{secrets.token_urlsafe(32)}"
