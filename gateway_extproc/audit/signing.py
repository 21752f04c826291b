"""Ed25519 keys for audit checkpoints: the gateway signs with a private key read from a
file (a Kubernetes Secret); auditors verify with the public key the chart publishes.

A key is named by its id, the first 16 hex digits of SHA-256 over the raw public key, so a
checkpoint says which key signed it and verify can say "signed by another key".
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class SigningKeyError(ValueError):
    """A key file that cannot be used; the message names the file and the fix."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    __slots__ = ("_key", "key_id", "public")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key()
        self.key_id = key_id(self.public)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "Signer":
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise SigningKeyError(f"audit.signingKeyFile {path}: cannot read it ({exc.strerror}); create one with "
                            "`gateway-extproc audit keygen --out FILE`") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError):
            raise SigningKeyError(f"audit.signingKeyFile {path}: not an unencrypted PEM private key; create one with "
                            "`gateway-extproc audit keygen --out FILE`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise SigningKeyError(f"audit.signingKeyFile {path}: not an Ed25519 key; create one with "
                            "`gateway-extproc audit keygen --out FILE`")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        """Base64 of the 64-byte signature: always 88 ASCII bytes."""
        return base64.b64encode(self._key.sign(data))


SIGNATURE_B64_LEN = 88


def load_public(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except OSError as exc:
        raise SigningKeyError(f"{path}: cannot read the public key ({exc.strerror})") from None
    except ValueError:
        raise SigningKeyError(f"{path}: not a PEM public key (the `.pub` file `audit keygen` wrote)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningKeyError(f"{path}: not an Ed25519 public key")
    return key


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def verify(public: Ed25519PublicKey, signature_b64: bytes, data: bytes) -> bool:
    try:
        raw = base64.b64decode(signature_b64, validate=True)
        public.verify(raw, data)
    except (InvalidSignature, ValueError):
        return False
    return base64.b64encode(raw) == signature_b64  # canonical: no second spelling of one signature


def generate(out: Path) -> tuple[Path, Path]:
    """Write a new private key (mode 0600) and its public key beside it (`<out>.pub`)."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = out.with_name(out.name + ".pub")
    pub.write_bytes(public_pem(key.public_key()))
    return out, pub
