"""The least an ext_proc can do on the gateway's Envoy config: the bench's "floor" rows.

    python bench/floor_extproc.py unix:///path/extproc-0.sock

Same gRPC stack as the gateway (grpc.aio on uvloop, one process) and the same messages
from Envoy, but no policy: the router stream reads `model` from the body and sets the route
header, and switches an SSE response to STREAMED; the upstream (per-attempt) stream sets
the provider path and credential. No auth, budgets, tokens, logs or metrics. What the
gateway costs above these rows is its own logic; what these rows cost is the protocol.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
from gateway_extproc._proto.envoy.config.core.v3 import base_pb2
from gateway_extproc._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from gateway_extproc.processors import responses

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED


def _set(headers: dict[str, str]) -> ep.HeaderMutation:
    return ep.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
        for k, v in headers.items()])


RAN_HEADER = "x-floor-response-path"
_BURN_S = float(os.environ.get("FLOOR_BURN_US", "0")) / 1e6


def _burn() -> None:
    """`FLOOR_BURN_US`: this much of the main thread's CPU per message, as stand-in logic
    (bench/transport_spike.py: what a microsecond of Python costs once it is behind gRPC)."""
    end = time.thread_time() + _BURN_S
    while time.thread_time() < end:
        pass


class Floor:
    """The floor's answers, whatever carries them (grpc.aio here, grpclib in floor_grpclib.py)."""

    def __init__(self) -> None:
        self.upstream_headers = _set({":path": "/v1/chat/completions",
                                      "authorization": f"Bearer {os.environ.get('MOCK_PROVIDER_API_KEY', '')}"})
        self.ran = _set({RAN_HEADER: "1"})
        self.unauth = ep.HeaderMutation(remove_headers=["authorization"])
        self.upstream: bool | None = None

    def answer(self, req: ep.ProcessingRequest) -> ep.ProcessingResponse:
        if _BURN_S:
            _burn()
        kind = req.WhichOneof("request")
        if self.upstream is None:
            self.upstream = bool(req.attributes)  # only the upstream filter asks for attributes
        if kind == "request_headers":
            if self.upstream:
                return ep.ProcessingResponse(request_headers=ep.HeadersResponse(
                    response=ep.CommonResponse(header_mutation=self.upstream_headers)))
            # The chart's router filter skips responses until this answer turns them on, as
            # the gateway's does (without it the floor would save two of its four round trips);
            # and it clears the route a client's own headers chose, as the gateway's does.
            return responses.request_headers(ep.CommonResponse(header_mutation=self.unauth, clear_route_cache=True),
                                             process_response=True)
        if kind == "request_body":
            if self.upstream:
                return ep.ProcessingResponse(request_body=ep.BodyResponse())
            model = orjson.loads(req.request_body.body).get("model", "")
            return ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                header_mutation=_set({"x-gateway-model": model}), clear_route_cache=True)))
        if kind == "response_headers":
            # A marker the bench's preflight checks: the response path ran.
            resp = ep.ProcessingResponse(response_headers=ep.HeadersResponse(
                response=ep.CommonResponse(header_mutation=self.ran)))
            if any(h.key == "content-type" and h.raw_value.startswith(b"text/event-stream")
                   for h in req.response_headers.headers.headers):
                resp.mode_override.response_body_mode = _STREAMED
            return resp
        return ep.ProcessingResponse(**{kind: ep.BodyResponse() if kind.endswith("body") else ep.HeadersResponse()})

    def last(self, req: ep.ProcessingRequest) -> bool:
        """Envoy sends nothing more on this stream (server.py `_last_message`)."""
        kind = req.WhichOneof("request")
        if kind == "response_headers":
            return bool(self.upstream) or req.response_headers.end_of_stream
        return kind == "response_body" and req.response_body.end_of_stream


class FloorProcessor(ep_grpc.ExternalProcessorServicer):
    async def Process(self, requests: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        floor = Floor()
        async for req in requests:
            yield floor.answer(req)
            if floor.last(req):
                await asyncio.sleep(30)  # wait for Envoy's reset, holding no batch, as server.py does
                return


async def serve(address: str) -> None:
    # Here, not at the top: floor_grpclib.py imports this module, and grpclib registers the
    # same health protos.
    from grpc_health.v1 import _async as health_async
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    server = grpc.aio.server()
    ep_grpc.add_ExternalProcessorServicer_to_server(FloorProcessor(), server)
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    if address.startswith("unix://"):
        Path(address[len("unix://"):]).unlink(missing_ok=True)
    server.add_insecure_port(address)
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(sys.argv[1]))
    else:
        uvloop.run(serve(sys.argv[1]))
