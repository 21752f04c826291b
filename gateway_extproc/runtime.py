"""What a running ext_proc process holds: the validated config plus provider credentials.

Credentials are read once at load (env var or file), never per request, and never logged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import structlog

from . import config as config_mod
from . import tokens
from .config import GatewayConfig, Provider
from .telemetry.metrics import Labels

log = structlog.get_logger("gateway_extproc.runtime")


@dataclass(frozen=True, slots=True)
class Runtime:
    config: GatewayConfig
    credentials: dict[str, str | None]  # provider name -> key; None when the source was empty
    labels: Labels

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Runtime":
        return cls.from_config(config_mod.load(path))

    @classmethod
    def from_config(cls, cfg: GatewayConfig) -> "Runtime":
        for model in cfg.models.values():
            tokens.counter(model.tokenizer)("warm up")  # load encodings now, not on a request
        labels = Labels(cfg.teams, cfg.models, cfg.providers, cfg.backends)
        return cls(cfg, {name: _read_credential(p) for name, p in cfg.providers.items()}, labels)


def _read_credential(p: Provider) -> str | None:
    if p.credential_env is not None:
        value = os.environ.get(p.credential_env, "").strip()
        source = f"env {p.credential_env}"
    else:
        try:
            value = Path(p.credential_file or "").read_text(encoding="utf-8").strip()
        except OSError:
            value = ""
        source = f"file {p.credential_file}"
    if not value:
        # Only the ext_proc's copy is missing; Envoy may still inject it natively (docs/configuration.md).
        log.warning("provider_credential_unavailable", provider=p.name, source=source)
    return value or None
