"""The gateway's ext_proc worker on grpclib instead of grpc.aio: a spike for issue 16's
stack proposal (bench/grpclib_spike.py measures it). Not what `serve` runs.

    python bench/grpclib_gateway.py path/to/gateway.yaml

One process on the config's first listen address, with the worker's own setup (tracing,
audit) and the very same stream logic: `server.ExternalProcessor.Process` unchanged, fed by
a grpclib stream through a two-method stand-in for grpc.aio's servicer context (the last
reply is written shielded, then the handler waits until Envoy's reset cancels it, as under
grpc.aio). What differs is only the transport: HTTP/2 parsed in Python on the event loop
(h2), no gRPC core threads and no socket-pair hand-off per completion.
"""

from __future__ import annotations

import sys
from typing import Any

from grpclib.const import Cardinality, Handler
from grpclib.server import Server, Stream

from gateway_extproc import audit, sockets
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc.reload import RuntimeRef
from gateway_extproc.runtime import Runtime
from gateway_extproc.server import ExternalProcessor
from gateway_extproc.telemetry import tracing
from grpc_health.v1 import health_pb2  # the gateway's health messages (grpclib's own would clash with them)


class _Context:
    """What `ExternalProcessor.Process` asks of grpc.aio's servicer context."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream[ep.ProcessingRequest, ep.ProcessingResponse]) -> None:
        self._stream = stream

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        return tuple(self._stream.metadata.items()) if self._stream.metadata else ()

    async def write(self, resp: ep.ProcessingResponse) -> None:
        await self._stream.send_message(resp)


class GrpclibProcessor:
    def __init__(self, runtime: RuntimeRef) -> None:
        self._servicer = ExternalProcessor(runtime)

    async def process(self, stream: Stream[ep.ProcessingRequest, ep.ProcessingResponse]) -> None:
        async for resp in self._servicer.Process(stream, _Context(stream)):  # type: ignore[arg-type]
            await stream.send_message(resp)

    def __mapping__(self) -> dict[str, Any]:
        return {"/envoy.service.ext_proc.v3.ExternalProcessor/Process":
                Handler(self.process, Cardinality.STREAM_STREAM, ep.ProcessingRequest, ep.ProcessingResponse)}


class HealthCheck:
    """grpc.health.v1 Check, always SERVING: what Envoy's gRPC health check asks."""

    async def check(self, stream: Stream[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]) -> None:
        await stream.recv_message()
        await stream.send_message(health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING))

    def __mapping__(self) -> dict[str, Any]:
        return {"/grpc.health.v1.Health/Check": Handler(self.check, Cardinality.UNARY_UNARY,
                                                        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse)}


async def serve(runtime: RuntimeRef, path: str) -> None:
    server = Server([GrpclibProcessor(runtime), HealthCheck()])
    await server.start(path=path)
    await server.wait_closed()


def main(config_path: str) -> int:
    runtime = RuntimeRef(Runtime.load(config_path), config_path)
    path = sockets.unix_path(runtime.current.config.listen[0])
    if path is None:
        print("grpclib_gateway: the spike serves a unix socket only", file=sys.stderr)
        return 2
    sockets.claim(path)  # as a worker does: the lock is held until this process exits
    tracing.setup()
    audit.start(runtime.current.config, 0)
    try:
        import uvloop

        uvloop.run(serve(runtime, str(path)))
    finally:
        audit.stop()
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
