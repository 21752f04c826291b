"""Tamper-evident audit trail (docs/audit.md).

One sink per ext_proc process, started by the worker and written by a background thread;
the router and the config reloader hand it events through the functions below, which do
nothing when `audit:` is off. Each process writes chains of its own, so processes and
replicas never coordinate.
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import structlog

from . import events
from .settings import AuditSettings

if TYPE_CHECKING:
    from ..config import Backend, GatewayConfig
    from ..processors.router import RouterProcessor
    from .writer import AuditSink

log = structlog.get_logger("gateway_extproc.audit")
_sink: "AuditSink | None" = None


def start(cfg: "GatewayConfig", worker: int) -> "AuditSink | None":
    """Start this process's sink when the config has `audit:`; fails (and so the worker does)
    when the signing key cannot be read: no audit trail, no service."""
    global _sink
    settings = cfg.audit
    if settings is None:
        return None
    from .signing import Signer
    from .writer import AuditSink

    instance = f"{settings.instance or socket.gethostname()}-w{worker}"
    try:
        _sink = AuditSink(settings, Signer.from_file(settings.signing_key_file), instance).start()
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("audit_start_failed", error=str(exc))
        raise
    _sink.put(events.config_event(cfg, "loaded"))
    return _sink


def stop() -> None:
    global _sink
    if _sink is not None:
        _sink.stop()
        _sink = None


def request(p: "RouterProcessor", backend: "Backend | None", outcome: str) -> None:
    if _sink is not None:
        _sink.put(events.request_event(p, backend, outcome))


def config_applied(cfg: "GatewayConfig") -> None:
    if _sink is not None:
        _sink.put(events.config_event(cfg, "reloaded"))
        if cfg.audit != _sink.settings:
            log.warning(
                "audit_settings_changed", note="audit settings apply at process start; restart the ext_proc")


def config_rejected(path: str, error: str) -> None:
    if _sink is not None:
        _sink.put(events.config_rejected_event(path, error))


__all__ = ["AuditSettings", "config_applied", "config_rejected", "request", "start", "stop"]
