"""Tamper-evident audit trail (docs/audit.md).

One sink per ext_proc process, started by the worker and written by a background thread;
the router and the config reloader hand it events through the functions below, which do
nothing when `audit:` is off. Each process writes chains of its own, so processes and
replicas never coordinate. The `serve` parent, which runs the key admin API, writes its
admin events to a chain of its own (`<instance>-admin`), beside its workers' (`-w<i>`).
"""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

import structlog

from . import events
from .settings import AuditSettings

if TYPE_CHECKING:
    from ..config import Backend, GatewayConfig
    from ..processors.router import Consumed, RouterProcessor
    from .writer import AuditSink

log = structlog.get_logger("gateway_extproc.audit")
_sink: "AuditSink | None" = None


def start(cfg: "GatewayConfig", worker: int | str, record_load: bool = True) -> "AuditSink | None":
    """Start this process's sink when the config has `audit:`; fails (and so the worker does)
    when the signing key cannot be read: no audit trail, no service."""
    global _sink
    settings = cfg.audit
    if settings is None:
        return None
    from .signing import Signer
    from .writer import AuditSink

    suffix = f"w{worker}" if isinstance(worker, int) else worker
    instance = f"{settings.instance or socket.gethostname()}-{suffix}"
    try:
        _sink = AuditSink(settings, Signer.from_file(settings.signing_key_file), instance).start()
    except (ValueError, RuntimeError, OSError) as exc:
        log.error("audit_start_failed", error=str(exc))
        raise
    if record_load:
        _sink.put(events.config_event(cfg, "loaded"))
    return _sink


def start_admin(cfg: "GatewayConfig") -> "AuditSink | None":
    """The `serve` parent's sink for key admin events: its own chain directory, so the parent
    never writes a worker's chain. Same settings and key; fails like a worker's."""
    return start(cfg, "admin", record_load=False)


def stop() -> None:
    global _sink
    if _sink is not None:
        _sink.stop()
        _sink = None


def request(p: "RouterProcessor", backend: "Backend | None", outcome: str, spent: "Consumed",
            content: dict[str, str]) -> None:
    if _sink is not None:
        _sink.put(events.request_event(p, backend, outcome, spent, content))


def config_applied(cfg: "GatewayConfig") -> None:
    if _sink is not None:
        _sink.put(events.config_event(cfg, "reloaded"))
        if cfg.audit != _sink.settings:
            log.warning(
                "audit_settings_changed", note="audit settings apply at process start; restart the ext_proc")


def admin(actor: str | None, action: str, key_id: str | None, config: str | None, **details: object) -> None:
    if _sink is not None:
        _sink.put(events.admin_event(actor, action, key_id, config, details))


def config_rejected(path: str, error: str) -> None:
    if _sink is not None:
        _sink.put(events.config_rejected_event(path, error))


__all__ = ["AuditSettings", "admin", "config_applied", "config_rejected", "request", "start", "start_admin",
           "stop"]
