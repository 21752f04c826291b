"""The ext_proc gRPC server: picks a processor per stream and relays messages; no policy.

`serve` runs one process per listen address (the chart renders one Unix socket per
process, each an endpoint of Envoy's `gateway_extproc` cluster), because one Python
process is bound to one core. Nothing a stream needs lives in another process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, multiprocess, start_http_server

from .errors import GatewayError
from .processors import responses
from .processors.router import RouterProcessor
from .processors.upstream import UpstreamProcessor, is_upstream
from .reload import RuntimeRef
from .runtime import Runtime
from .telemetry import tracing
from .telemetry.metrics import PHASE_LATENCY

log = structlog.get_logger("gateway_extproc.server")

# Streams in flight get this long to finish after SIGTERM (LLM streams are long).
DRAIN_SECONDS = 30.0
_REQUEST_PHASES = ("request_headers", "request_body")
_PHASES = {phase: PHASE_LATENCY.labels(phase) for phase in (
    "request_headers", "request_body", "response_headers", "response_body", "request_trailers", "response_trailers")}


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
                started = time.perf_counter()
                try:
                    resp = await processor.handle(req)
                except Exception:
                    log.exception("processing_failed", phase=req.WhichOneof("request"))
                    resp = _fallback(req)
                _PHASES[req.WhichOneof("request")].observe(time.perf_counter() - started)
                yield resp
        finally:
            if processor is not None:
                processor.close()


def _fallback(req: ep.ProcessingRequest) -> ep.ProcessingResponse:
    """After a bug: refuse a request not yet sent; let an already-flowing response pass."""
    kind = req.WhichOneof("request")
    if kind in _REQUEST_PHASES:
        return responses.error(GatewayError("gateway_internal_error", "The gateway failed to process the request."))
    return ep.ProcessingResponse(**{kind: ep.BodyResponse() if kind.endswith("body") else ep.HeadersResponse()})


async def serve_one(runtime: RuntimeRef, address: str) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024),
                                      ("grpc.max_send_message_length", 64 * 1024 * 1024)])
    ep_grpc.add_ExternalProcessorServicer_to_server(ExternalProcessor(runtime), server)
    watcher = asyncio.get_running_loop().create_task(runtime.watch())
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if address.startswith("unix://"):
        sock = Path(address[len("unix://"):])
        sock.parent.mkdir(parents=True, exist_ok=True)
        sock.unlink(missing_ok=True)
    server.add_insecure_port(address)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    log.info("extproc_listening", address=address, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watcher.cancel()
    # Envoy's health checks see NOT_SERVING and stop opening streams here; open ones drain.
    await health.enter_graceful_shutdown()
    log.info("extproc_draining", address=address, grace_s=DRAIN_SECONDS)
    await server.stop(DRAIN_SECONDS)
    log.info("extproc_stopped", address=address)


def run_one(config_path: str, index: int) -> None:
    runtime = RuntimeRef(Runtime.load(config_path), config_path)
    address = runtime.current.config.listen[index]
    tracing.setup()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_one(runtime, address))
    else:
        uvloop.run(serve_one(runtime, address))
    finally:
        tracing.shutdown()


def serve(config_path: str) -> int:
    """Start one worker process per listen address; forward SIGTERM/SIGINT; exit when they do.

    If a worker dies on its own the others are stopped and serve exits non-zero, so the
    supervisor (Kubernetes, make run) restarts the set rather than running degraded.
    """
    runtime = Runtime.load(config_path)  # validate before forking
    metrics_dir = tempfile.mkdtemp(prefix="gateway-extproc-metrics-")
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    workers = [subprocess.Popen([sys.executable, "-m", "gateway_extproc", "serve-one", config_path, str(i)], env=env)
               for i in range(len(runtime.config.listen))]
    if runtime.config.metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=metrics_dir)
        start_http_server(runtime.config.metrics_port, runtime.config.metrics_address, registry)
        log.info("metrics_listening", address=runtime.config.metrics_address, port=runtime.config.metrics_port)
    if runtime.config.identity.key_admin is not None:
        from .keyadmin import start

        start(config_path, runtime.config)  # a daemon thread of this parent, never Envoy's listener
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for w in workers:
            if w.poll() is None:
                w.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    try:
        code = _supervise(workers, forward, lambda: stopping)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return code


def _supervise(workers: list[subprocess.Popen[bytes]], forward: Any, stopping: Any) -> int:
    code = 0
    while any(w.poll() is None for w in workers):
        for w in workers:
            rc = w.poll()
            if rc is not None and not stopping():
                log.error("extproc_worker_exited", pid=w.pid, returncode=rc)
                code = rc or 1
                forward(signal.SIGTERM, None)
        try:
            workers[0].wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            pass
    return code
