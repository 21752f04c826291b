"""The log masking's cheap pre-test never lets a secret through: whatever the values, the
processor's output is what masking every string value one by one gives."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway_extproc.logs import _SECRET, redact_secrets

SECRETS = st.sampled_from(["gwk_demo_a-secret_value", "sk-abcdefgh1234", "sk-proj_ABCDEFGHijkl-xyz", "Bearer tok.en",
                           "bEaReR\tabc", "BEARER  x", "authorization: bearer abc"])
TEXT = st.text(alphabet=st.sampled_from(list("abcsk-_gwkBEARERbearer \t\n0123456789./:")), max_size=40)
VALUES = st.one_of(TEXT, st.builds(lambda a, s, b: a + s + b, TEXT, SECRETS, TEXT), st.integers(), st.none(),
                   st.booleans(), st.floats(allow_nan=False))


def masked_one_by_one(event: dict[str, Any]) -> dict[str, Any]:
    return {k: _SECRET.sub("[REDACTED]", v) if isinstance(v, str) else v for k, v in event.items()}


@given(st.dictionaries(st.sampled_from(["event", "path", "key_id", "a", "b", "c"]), VALUES, max_size=6))
def test_masking_equals_masking_each_value(event: dict[str, Any]) -> None:
    assert redact_secrets(None, "info", dict(event)) == masked_one_by_one(event)


@given(TEXT, SECRETS, TEXT)
def test_no_secret_survives(before: str, secret: str, after: str) -> None:
    out = redact_secrets(None, "info", {"event": "access", "path": before + secret + after, "status": 200})
    assert _SECRET.search(out["path"]) is None and "[REDACTED]" in out["path"]
