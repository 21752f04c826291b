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
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import orjson
from gateway_extproc._proto.envoy.config.core.v3 import base_pb2
from gateway_extproc._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_STREAMED = processing_mode_pb2.ProcessingMode.STREAMED


def _set(headers: dict[str, str]) -> ep.HeaderMutation:
    return ep.HeaderMutation(set_headers=[
        base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()), append_action=_OVERWRITE)
        for k, v in headers.items()])


class FloorProcessor(ep_grpc.ExternalProcessorServicer):
    def __init__(self) -> None:
        self.upstream_headers = _set({":path": "/v1/chat/completions",
                                      "authorization": f"Bearer {os.environ.get('MOCK_PROVIDER_API_KEY', '')}"})

    async def Process(self, requests: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        upstream: bool | None = None
        async for req in requests:
            kind = req.WhichOneof("request")
            if upstream is None:
                upstream = bool(req.attributes)  # only the upstream filter asks for attributes
            if kind == "request_headers":
                mutation = self.upstream_headers if upstream else ep.HeaderMutation(remove_headers=["authorization"])
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse(
                    response=ep.CommonResponse(header_mutation=mutation)))
            elif kind == "request_body":
                if upstream:
                    yield ep.ProcessingResponse(request_body=ep.BodyResponse())
                    continue
                model = orjson.loads(req.request_body.body).get("model", "")
                yield ep.ProcessingResponse(request_body=ep.BodyResponse(response=ep.CommonResponse(
                    header_mutation=_set({"x-gateway-model": model}), clear_route_cache=True)))
            elif kind == "response_headers":
                resp = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
                if any(h.key == "content-type" and h.raw_value.startswith(b"text/event-stream")
                       for h in req.response_headers.headers.headers):
                    resp.mode_override.response_body_mode = _STREAMED
                yield resp
                if upstream or req.response_headers.end_of_stream:
                    await asyncio.sleep(30)  # Envoy sends nothing more: wait for its reset, as server.py does
                    return
            else:
                yield ep.ProcessingResponse(**{kind: ep.BodyResponse() if kind.endswith("body")
                                               else ep.HeadersResponse()})
                if kind == "response_body" and req.response_body.end_of_stream:
                    await asyncio.sleep(30)
                    return


async def serve(address: str) -> None:
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
