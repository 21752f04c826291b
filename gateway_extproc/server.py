"""The ext_proc gRPC server: picks a processor per stream and relays messages; no policy.

`serve` runs one process per listen address (the chart renders one Unix socket per
process, each an endpoint of Envoy's `gateway_extproc` cluster), because one Python
process is bound to one core. Nothing a stream needs lives in another process.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import structlog
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, start_http_server

from . import audit, sockets
from . import config as config_mod
from .admission import LARGE_BYTES
from .budgets import settlements
from .config import ConfigError
from .errors import GatewayError
from .processors import responses
from .processors.router import RouterProcessor
from .processors.upstream import UpstreamProcessor, is_upstream
from .procs import die_with_parent, exit_reason
from .reload import RuntimeRef
from .runtime import Runtime
from .telemetry import export, tracing
from .telemetry.metrics import AUDIT_EVENTS, EXTPROC_ERRORS, PHASE_LATENCY

log = structlog.get_logger("gateway_extproc.server")

# Streams in flight get this long to finish after SIGTERM (LLM streams are long).
DRAIN_SECONDS = 30.0
_REQUEST_PHASES = ("request_headers", "request_body")
_PHASES = {phase: PHASE_LATENCY.labels(phase) for phase in (
    "request_headers", "request_body", "response_headers", "response_body", "request_trailers", "response_trailers")}
_ERRORS = {phase: EXTPROC_ERRORS.labels(phase) for phase in _PHASES}


class ExternalProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self, runtime: RuntimeRef) -> None:
        self.runtime = runtime

    async def Process(self, request_iterator: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        processor: RouterProcessor | UpstreamProcessor | None = None
        try:
            async for req in request_iterator:
                if processor is None:
                    # One config snapshot per stream, even if a reload swaps it meanwhile.
                    processor = (UpstreamProcessor if is_upstream(req) else RouterProcessor)(self.runtime.current)
                    if isinstance(processor, RouterProcessor) and context is not None and tracing.on():
                        processor.trace_parent = _trace_context(context)
                started, phase = time.perf_counter(), req.WhichOneof("request")
                if isinstance(processor, RouterProcessor) and phase in ("request_body", "response_body") \
                        and len(getattr(req, phase).body) > LARGE_BYTES:
                    # Its wait (a request's) and work (parsing, scanning: seconds for megabytes of
                    # numbers on a busy process) may outlast the message timeout.
                    yield responses.LARGE_BODY_TIME
                try:
                    resp = await processor.handle(req)
                except Exception:
                    log.exception("processing_failed", phase=phase)
                    _ERRORS[phase].inc()
                    resp = _fallback(req, processor)
                _PHASES[phase].observe(time.perf_counter() - started)
                if context is not None and _last_message(req, phase, resp, isinstance(processor, UpstreamProcessor)):
                    await _write_last(context, resp)  # until Envoy's reset cancels this handler
                    return
                yield resp
        finally:
            if processor is not None:
                processor.close()
        if context is not None:
            # Envoy half-closed the stream before its usual last message (the client left
            # mid-request or mid-reply): its reset follows at once. Wait for it with no batch
            # open rather than send a status that races it and leaks (see _write_last).
            await asyncio.sleep(RESET_WAIT_S)


def _last_message(req: ep.ProcessingRequest, phase: str, resp: ep.ProcessingResponse, upstream: bool) -> bool:
    """Whether Envoy sends nothing more on this stream after this reply.

    Which message is the last follows the chart's processing modes (templates/_envoy.tpl,
    pinned by tests/test_server_streams.py): trailers SKIP, so the router's stream ends with
    `end_of_stream` on the response headers or body, and the upstream (per-attempt)
    filter's with the response headers (body NONE); an immediate response ends any stream.
    A stream Envoy ends early (the client left mid-request or mid-reply) ends with Envoy's
    half-close instead, and the handler then waits for the reset (Process). A body ended
    by trailers changes nothing here: the router's stream still ends with the response.
    """
    if phase == "response_body":
        return req.response_body.end_of_stream
    if phase == "response_headers":
        return upstream or req.response_headers.end_of_stream
    return resp.HasField("immediate_response")


def _retrieve(task: "asyncio.Future[None]") -> None:
    if not task.cancelled():
        task.exception()  # a write on a call Envoy already reset fails: nothing to report


# How long a stream waits after its last reply for Envoy's reset before it ends itself
# with an OK status (a client that never resets; Envoy always does, within milliseconds of
# the end of the request, or of the attempt's response for an upstream stream).
RESET_WAIT_S = 30.0


async def _write_last(context: grpc.aio.ServicerContext, resp: ep.ProcessingResponse) -> None:
    """Send the stream's last reply, then wait for Envoy's reset with no gRPC batch open.

    Envoy ends every ext_proc stream by half-closing it and resetting it at once
    (ext_proc client_impl.cc `close()`). In grpc aio (1.85, grpc/grpc#43360) a batch that
    fails, or whose awaiting task is cancelled, leaks its C `grpc_op` array and what its
    operations hold. A handler that reads on after its last reply loses one of those per
    stream (its read, or its final status, hits the reset call: ~115 bytes of heap per
    request, for ever: bench/SOAK.md); one that returns at once still loses its status
    batch whenever the reset wins the race to it. So the last write is shielded (its batch
    completes and is freed even if the reset cancels the handler meanwhile), and then the
    handler holds no batch while it waits: the reset cancels it, grpc sends no status, and
    nothing is left behind. Only a client that never resets gets the OK status, after
    RESET_WAIT_S.
    """
    write = asyncio.ensure_future(context.write(resp))
    write.add_done_callback(_retrieve)
    await asyncio.shield(write)
    await asyncio.sleep(RESET_WAIT_S)


def _trace_context(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """`traceparent`/`tracestate` Envoy's tracer put in this stream's metadata, if any."""
    return {k: v for k, v in (context.invocation_metadata() or ()) if k in ("traceparent", "tracestate")
            and isinstance(v, str)}


def _fallback(req: ep.ProcessingRequest, processor: RouterProcessor | UpstreamProcessor | None
              ) -> ep.ProcessingResponse:
    """After a bug: refuse a request not yet sent; end an answer whose piece could not be read
    (`RouterProcessor.unread_answer`); let other response messages pass. The
    router's own refusal (`reject`) when it can: its access line, metrics, span and audit
    record then say 500 `gateway_internal_error`, as the client got, and the request (never
    sent) is not charged."""
    kind = req.WhichOneof("request")
    if kind in _REQUEST_PHASES:
        err = GatewayError("gateway_internal_error", "The gateway failed to process the request.")
        if isinstance(processor, RouterProcessor) and not processor.logged:
            try:
                return processor.reject(err)
            except Exception:
                log.exception("processing_failed", phase=kind)  # refused all the same, below
        return responses.error(err)
    if kind == "response_body" and isinstance(processor, RouterProcessor):
        try:
            return processor.unread_answer()  # (never the piece as it came: it was not read)
        except Exception:
            log.exception("processing_failed", phase=kind)
            return responses.response_body(responses.common(body=b""))
    return ep.ProcessingResponse(**{kind: ep.BodyResponse() if kind.endswith("body") else ep.HeadersResponse()})


async def serve_one(runtime: RuntimeRef, address: str, index: int = 0) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(runtime), server)
    watcher = asyncio.get_running_loop().create_task(runtime.watch())
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(address)
    await server.start()
    snapshots = await export.serve_snapshots(index)  # the `serve` parent's /metrics asks here
    quiet_collector()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("extproc_listening", address=address, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, runtime.nudge)
    await stop.wait()
    watcher.cancel()
    # Envoy's health checks see NOT_SERVING and stop opening streams here; open ones drain.
    await health.enter_graceful_shutdown()
    log.info("extproc_draining", address=address, grace_s=DRAIN_SECONDS)
    await server.stop(DRAIN_SECONDS)
    await settlements.settled(DRAIN_SECONDS)  # the drained requests' budget settlements
    if snapshots is not None:
        snapshots.close()
    log.info("extproc_stopped", address=address)


# Container objects allocated (net of those freed) between collections of the youngest
# generation; Python's default is 700.
GC_YOUNG = 10_000


def quiet_collector() -> None:
    """Keep the cyclic garbage collector off the hot path. A request allocates and frees
    thousands of containers, nearly none in a reference cycle, yet at Python's defaults they
    set off a collection every few requests and a full one every few thousand, which walks
    the whole start-up heap (config, scanner tables, tokenizers, gRPC and protobuf
    descriptors): ~5 % of a worker's CPU and 50–115 ms stalls of every stream (bench/README).
    So the start-up heap is frozen out of collections (until a config reload unfreezes it,
    reload.py) and the youngest generation is collected less often; what a request leaves in
    a cycle is still collected."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


# A worker exits with this when it cannot start (bad config, socket owned by another
# gateway), after printing the `error:` line (sysexits.h EX_CONFIG; a config error on a
# first start is `serve`'s to print). On its first start
# `serve` then stops with that error; a restarted worker is retried with backoff, since
# the file may be fixed meanwhile.
EXIT_CONFIG = 78
_SUPERVISOR_ENV = "GATEWAY_EXTPROC_SUPERVISOR"
_QUIET_ENV = "GATEWAY_EXTPROC_QUIET_CONFIG_ERROR"  # set on a first start: `serve` prints it, once


def run_one(config_path: str, index: int) -> int:
    """One worker, started by `serve`. It is killed with its supervisor: a worker nobody
    supervises would hold its socket with a config nobody reloads."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve_one reloads on it (it killed a worker)
    if parent := os.environ.get(_SUPERVISOR_ENV):
        die_with_parent(signal.SIGKILL, int(parent))
    try:
        runtime = RuntimeRef(Runtime.load(config_path), config_path)
        address = runtime.current.config.listen[index]
        path = sockets.unix_path(address)
        if path is not None:
            sockets.claim(path)  # the lock fd stays open, so held, until this process exits
    except (ConfigError, sockets.SocketInUse) as exc:
        if not (isinstance(exc, ConfigError) and os.environ.get(_QUIET_ENV)):
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    tracing.setup()
    audit.start(runtime.current.config, index)
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_one(runtime, address, index))
    else:
        uvloop.run(serve_one(runtime, address, index))
    finally:
        audit.stop()
        tracing.shutdown()
    return 0


# Restart delay after a worker dies: doubles per death, reset once a worker has run this long.
_BACKOFF_FIRST_S, _BACKOFF_MAX_S, _HEALTHY_AFTER_S = 0.1, 10.0, 30.0


@dataclass
class _Worker:
    index: int
    address: str
    proc: subprocess.Popen[bytes]
    started: float
    up: bool = False  # has listened at least once (since serve started)
    deaths: int = 0  # consecutive short-lived runs, for the backoff
    restart_at: float | None = None


def serve(config_path: str) -> int:
    """Start one worker process per listen address and keep them running.

    A worker that dies after it has served is restarted with backoff (logged, counted in
    genai_gateway_extproc_worker_restarts_total) while Envoy sends streams to the others.
    A worker that cannot start the first time (bad config, socket in use) stops serve with
    its error: restarting it would only repeat it. SIGTERM/SIGINT drain and stop all; SIGHUP
    is passed on to the workers that are up, which reload now (at its default, it killed
    `serve` and so every worker: `kill -HUP`, a closed terminal).

    The workers start as soon as the file reads as a config, and this process builds the
    whole Runtime (the scanner's patterns, ~2 s) to check the file while they build theirs:
    one after the other, a start took ~7 s instead of ~4. A config error is printed here,
    once; the first workers exit on it without a word (`_QUIET_ENV`).
    """
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # also what the first workers inherit
    try:
        cfg = config_mod.load(config_path)
        for address in cfg.listen:
            if path := sockets.unix_path(address):
                sockets.check_free(path)
    except (ConfigError, sockets.SocketInUse) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    metrics_dir = tempfile.mkdtemp(prefix="gateway-extproc-metrics-")
    env = {**os.environ, export.DIR_ENV: metrics_dir, _SUPERVISOR_ENV: str(os.getpid())}

    def spawn(index: int, first: bool = False) -> subprocess.Popen[bytes]:
        return subprocess.Popen([sys.executable, "-m", "gateway_extproc", "serve-one", config_path, str(index)],
                                env={**env, _QUIET_ENV: "1"} if first else env)

    workers = [_Worker(i, a, spawn(i, first=True), time.monotonic()) for i, a in enumerate(cfg.listen)]

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr, flush=True)
        for w in workers:  # (still starting: nothing to drain)
            w.proc.kill()
            w.proc.wait()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        return 1

    try:
        Runtime.from_config(cfg)  # what the workers build; its errors are the file's
    except ConfigError as exc:
        return fail(str(exc))
    registry = CollectorRegistry()
    disable_created_metrics()  # no `_created` timestamp series for the one counter kept here
    restarts = Counter("genai_gateway_extproc_worker_restarts", "ext_proc worker processes restarted after "
                       "dying (crash, OOM kill).", registry=registry)
    # The admin API's audit chain is written here, in the parent: its events join the workers'.
    workers_metrics = export.WorkerMetrics(metrics_dir, len(cfg.listen), own=(AUDIT_EVENTS.name,))
    if cfg.metrics_port:
        registry.register(workers_metrics)
        workers_metrics.refresh_in_background()  # a worker's death loses ~1 s of counts, not a scrape's
        try:  # a busy port is a start-up error, not a crash
            start_http_server(cfg.metrics_port, cfg.metrics_address, registry)
        except OSError as exc:
            return fail(f"{config_path}: metrics.port {cfg.metrics_port} on {cfg.metrics_address}: "
                        f"{exc.strerror}; stop what holds it, or set extproc.metrics.port in the values "
                        "(0 turns /metrics off)")
        log.info("metrics_listening", address=cfg.metrics_address, port=cfg.metrics_port)
    admin = cfg.identity.key_admin
    if admin is not None:
        from .keyadmin import start

        try:  # admin events go to this parent's own chain; no trail, no admin API (fail closed)
            audit.start_admin(cfg)
        except (ValueError, RuntimeError, OSError) as exc:
            return fail(f"{config_path}: audit: {exc}")
        try:  # a daemon thread of this parent on its own port, never Envoy's listener
            start(config_path, cfg)
        except OSError as exc:
            audit.stop()
            return fail(f"{config_path}: identity.keyAdmin port {admin.port} on {admin.address}: {exc.strerror}; "
                        "stop what holds it, or set identity.keyAdmin.port in the values")
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.proc.poll() is None:
                w.proc.send_signal(signum)

    def reload(_signum: int, _frame: object) -> None:
        for w in workers:  # one still starting reads the file as it is anyway
            if w.up and w.proc.poll() is None:
                w.proc.send_signal(signal.SIGHUP)

    def config_error() -> None:
        """A first worker stopped on the file without a word, as it leaves that to this process,
        whose own check passed: the file changed in between, so its error is read again here."""
        try:
            Runtime.load(config_path)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, reload)
    try:
        return _supervise(workers, spawn, restarts, forward, lambda: stopping, workers_metrics.retire, config_error)
    finally:
        audit.stop()  # the admin chain's shutdown checkpoint
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _supervise(workers: list[_Worker], spawn: Callable[[int], subprocess.Popen[bytes]], restarts: Counter,
               forward: Callable[[int, object], None], stopping: Callable[[], bool],
               retire: Callable[[int], None], config_error: Callable[[], None]) -> int:
    code = 0
    while True:
        now = time.monotonic()
        for w in workers:
            rc = w.proc.poll()
            if rc is None:
                if not w.up and sockets.listening(w.address):
                    w.up = True
                    log.info("extproc_worker_ready", worker=w.index, pid=w.proc.pid)
                continue
            if stopping() or code:
                continue
            if w.restart_at is None:
                if not w.up:  # never served: a start-up problem, not a crash
                    log.error("extproc_worker_failed_to_start", worker=w.index, pid=w.proc.pid, reason=exit_reason(rc))
                    if rc == EXIT_CONFIG:
                        config_error()
                    code = rc if rc > 0 else 1
                    forward(signal.SIGTERM, None)
                    break
                if now - w.started >= _HEALTHY_AFTER_S:
                    w.deaths = 0
                delay = min(_BACKOFF_FIRST_S * 2 ** w.deaths, _BACKOFF_MAX_S)
                w.deaths += 1
                w.restart_at = now + delay
                retire(w.proc.pid)  # its last reported counts stay in the totals
                log.error("extproc_worker_died", worker=w.index, pid=w.proc.pid, reason=exit_reason(rc),
                          restart_in_s=round(delay, 2))
            elif now >= w.restart_at:
                w.proc, w.started, w.restart_at = spawn(w.index), now, None
                restarts.inc()
                log.warning("extproc_worker_restarted", worker=w.index, pid=w.proc.pid)
        if all(w.proc.poll() is not None for w in workers) and (stopping() or code):
            return code
        time.sleep(0.05)

