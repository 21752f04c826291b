"""The log masking's cheap pre-test never lets a secret through: whatever the values, the
processor's output is what masking every string value one by one gives."""

from __future__ import annotations

from typing import Any

import orjson

from hypothesis import given
from hypothesis import strategies as st

from gateway_extproc import logs
from gateway_extproc.logs import _SECRET, known_secrets, redact_secrets

SECRETS = st.sampled_from(["gwk_demo_a-secret_value", "sk-abcdefgh1234", "sk-proj_ABCDEFGHijkl-xyz", "Bearer tok.en",
                           "bEaReR\tabc", "BEARER  x", "authorization: bearer abc", "AKIAIOSFODNN7EXAMPLE",
                           "AIzaSyA-1234567890abcdefghijklmnopqrstu", "gwa_Qm9fXk2yqfT9v7S_3uJc1bXyA7w4pVmNw0HoZk2yq"])
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


# A provider credential of no known shape (an AWS secret key, a self-hosted model's token).
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@given(TEXT, SECRETS, TEXT)
def test_a_secret_nested_in_a_logged_value_is_masked(before: str, secret: str, after: str) -> None:
    """A value logged as a dict or list (a provider's error body, a header list) is masked
    at every depth, not only as a top-level string."""
    event = {"event": "x", "detail": {"body": {"error": [before + secret + after]}}, "headers": [("a", secret)]}
    out = redact_secrets(None, "info", event)
    assert secret not in str(out) and _SECRET.search(str(out)) is None


def test_the_loaded_provider_credentials_are_masked_whatever_their_shape() -> None:
    known_secrets([AWS_SECRET, None, "", "short"])
    try:
        out = redact_secrets(None, "info", {"event": "x", "error": f"signature with {AWS_SECRET} failed",
                                            "nested": {"k": [AWS_SECRET]}, "short": "short"})
        assert AWS_SECRET not in str(out) and out["error"] == "signature with [REDACTED] failed"
        assert out["short"] == "short"  # under 8 characters: too likely to be a word
    finally:
        known_secrets([])


def test_a_runtime_registers_its_provider_credentials(monkeypatch: Any) -> None:
    from gateway_extproc import config
    from gateway_extproc.runtime import Runtime

    monkeypatch.setenv("VLLM_TOKEN", AWS_SECRET)
    cfg = config.parse({"version": 1, "listen": ["unix:///tmp/x.sock"], "providers": [
        {"name": "vllm", "kind": "openai", "baseURL": "http://vllm:8000/v1", "credential": {"env": "VLLM_TOKEN"}}],
        "models": [{"name": "m", "backends": [{"provider": "vllm", "model": "llama"}]}]}, "gw.yaml")
    try:
        Runtime.from_config(cfg)
        assert AWS_SECRET in logs._known
    finally:
        known_secrets([])


def test_each_part_of_a_bedrock_credential_is_masked_alone(monkeypatch: Any) -> None:
    """Bedrock's credential is "key id:secret key": the secret key logged on its own (a
    signing error) is masked as the whole value is."""
    from gateway_extproc import config
    from gateway_extproc.runtime import Runtime

    monkeypatch.setenv("BEDROCK_KEY", f"ASIAEXAMPLEKEYID0000:{AWS_SECRET}")
    cfg = config.parse({"version": 1, "listen": ["unix:///tmp/x.sock"], "providers": [
        {"name": "aws", "kind": "bedrock", "baseURL": "https://bedrock-runtime.us-east-1.amazonaws.com",
         "region": "us-east-1", "credential": {"env": "BEDROCK_KEY"}}],
        "models": [{"name": "m", "backends": [{"provider": "aws", "model": "anthropic.claude"}]}]}, "gw.yaml")
    try:
        Runtime.from_config(cfg)
        out = redact_secrets(None, "info", {"event": "x", "error": f"bad secret {AWS_SECRET}", "id": "ASIAEXAMPLEKEYID0000"})
        assert AWS_SECRET not in str(out) and "ASIAEXAMPLEKEYID0000" not in str(out)
    finally:
        known_secrets([])


def test_a_credential_file_that_is_not_text_is_a_missing_credential_not_a_traceback(tmp_path: Any, capsys: Any) -> None:
    """A credential file holding bytes that are not UTF-8 (a DER blob, a UTF-16 save) raised
    UnicodeDecodeError out of Runtime.load: `serve` died with a traceback. It is read as a
    missing credential, like an unreadable file (docs/configuration.md), and the warning names
    the provider and why, never a byte of the file."""
    from gateway_extproc import config
    from gateway_extproc.runtime import Runtime

    secret_file = tmp_path / "key"
    secret_file.write_bytes(b"\xff\xfe" + "sk-proj-S3cretS3cret".encode("utf-16-le"))
    cfg = config.parse({"version": 1, "listen": ["unix:///tmp/x.sock"], "providers": [
        {"name": "vllm", "kind": "openai", "baseURL": "http://vllm:8000/v1", "credential": {"file": str(secret_file)}}],
        "models": [{"name": "m", "backends": [{"provider": "vllm", "model": "llama"}]}]}, "gw.yaml")
    runtime = Runtime.from_config(cfg)
    assert runtime.credentials == {"vllm": None}
    err = capsys.readouterr()
    out = err.out + err.err
    assert "provider_credential_unavailable" in out and "not UTF-8 text" in out
    assert "S3cret" not in out


@given(st.text(alphabet=st.sampled_from(list("ab \"\\{}:\n\r\t\x00\x1b\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029—é")),
               max_size=60))
def test_a_logged_value_never_breaks_its_line(value: str) -> None:
    """Each log line is one JSON object however a reader splits lines: on `\\n` (log shippers)
    or on every Unicode line break (Python's `str.splitlines`, JavaScript, log viewers).
    orjson writes U+2028, U+2029 and U+0085 raw, valid inside a JSON string: a prompt holding
    one (content logging) cut the access line in two pieces neither of which was JSON."""
    line = logs.render({"event": "access", "prompt": value, "status": 200})
    assert line.count(b"\n") == 0 and len(line.decode().splitlines()) == 1
    assert orjson.loads(line) == {"event": "access", "prompt": value, "status": 200}


def test_a_librarys_log_record_is_a_masked_json_line(capfd: Any) -> None:
    """OpenTelemetry's exporters, gRPC, asyncio and redis log through the standard library: an
    unreachable collector wrote plain-text lines (`Transient error StatusCode.UNAVAILABLE ...`)
    into the JSON stream, past the secret mask. They are JSON lines like the gateway's own,
    masked the same way, with the logger's name."""
    import logging

    import structlog

    root = logging.getLogger()
    handlers, level, config = list(root.handlers), root.level, structlog.get_config()
    logs.configure()
    logs.configure()  # (again: still one line per record)
    try:
        logging.getLogger("opentelemetry.exporter.otlp").warning(
            "Failed to export to %s\nsecond line", "collector:4317 with Bearer abc.def")
        logging.getLogger("some.library").debug("debug noise")
        try:
            raise ValueError("boom sk-abcdefgh12345678")
        except ValueError:
            logging.getLogger("asyncio").exception("Task exception was never retrieved")
        out = capfd.readouterr().out
    finally:
        root.handlers, root.level = handlers, level
        structlog.configure(**config)  # (its stdout was the capture's, closed after this test)
    lines = out.splitlines()
    assert len(lines) == 2, out
    first, second = map(orjson.loads, lines)
    assert first["event"] == "Failed to export to collector:4317 with [REDACTED]\nsecond line"
    assert first["level"] == "warning" and first["logger"] == "opentelemetry.exporter.otlp"
    assert second["level"] == "error" and "ValueError" in second["exception"]
    assert "sk-abcdefgh" not in out
