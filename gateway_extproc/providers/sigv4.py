"""AWS Signature Version 4 for one request, without botocore (a test-only dependency).

Matches botocore's `SigV4Auth` for non-S3 services byte for byte: the canonical URI is the
path with dot segments and empty segments removed, then URI-encoded once more (so an
already percent-encoded Bedrock model id such as `...v1%3A0` is signed as `...v1%253A0`);
the payload hash goes into the canonical request but, unlike S3, no
`x-amz-content-sha256` header is sent."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime, timezone
from urllib.parse import quote

_ALGORITHM = "AWS4-HMAC-SHA256"


def _canonical_uri(path: str) -> str:
    """botocore's `normalize_url_path` (RFC 3986 dot-segment removal, empty segments
    dropped) followed by `quote(..., safe="/~")`."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment and segment != ".":
            segments.append(segment)
    trailing = "/" if path.endswith("/") and segments else ""
    return quote("/" + "/".join(segments) + trailing, safe="/~")


def _canonical_query(query: str) -> str:
    """Pairs sorted as they appear in the URL (already encoded), as botocore does for a
    query string carried in the URL."""
    if not query:
        return ""
    pairs = sorted(pair.partition("=")[::2] for pair in query.split("&"))
    return "&".join(f"{key}={value}" for key, value in pairs)


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(method: str, host: str, path: str, query: str, headers: dict[str, str], body: bytes, *,
         access_key: str, secret_key: str, session_token: str | None, region: str, service: str,
         now: datetime) -> dict[str, str]:
    """The headers to add so AWS accepts the request: `x-amz-date`, `authorization` and,
    for temporary credentials, `x-amz-security-token`. Signs `host`, every header in
    `headers` (send exactly these, unchanged) and the headers added here. A naive `now` is
    taken as UTC."""
    utc = now.replace(tzinfo=timezone.utc) if now.tzinfo is None else now.astimezone(timezone.utc)
    stamp = utc.strftime("%Y%m%dT%H%M%SZ")
    added = {"x-amz-date": stamp}
    if session_token:
        added["x-amz-security-token"] = session_token
    signed = {name.lower(): " ".join(value.split()) for name, value in headers.items()}
    signed.update(added)
    signed["host"] = host
    names = sorted(signed)
    signed_headers = ";".join(names)
    canonical_request = "\n".join([
        method.upper(),
        _canonical_uri(path),
        _canonical_query(query),
        "".join(f"{name}:{signed[name]}\n" for name in names),
        signed_headers,
        hashlib.sha256(body).hexdigest(),
    ])
    scope = f"{stamp[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [_ALGORITHM, stamp, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = _hmac(f"AWS4{secret_key}".encode(), stamp[:8])
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    added["authorization"] = (f"{_ALGORITHM} Credential={access_key}/{scope}, "
                              f"SignedHeaders={signed_headers}, Signature={signature}")
    return added
