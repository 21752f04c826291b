"""The gateway's own logic per request, without gRPC: CPU microseconds per private-chat request
driven through `ExternalProcessor.Process` in-process (issue 16).

    .venv/bin/python bench/hot_path.py [--requests 4000] [--rounds 3] [--concurrency 1] [--stream] [--profile]

What `bench/run.py` measures through Envoy is this plus the gRPC transport (the no-op floor),
and the transport's share grows as throughput falls (bench/transport_spike.py). This script
takes the transport away, so a change to the router, policy, budgets, metrics, logging or
audit shows up here with little noise from the machine: the same Runtime `serve` builds from
values-local (rendered by the chart, limits lifted out of reach as bench/run.py does, audit
on into a temp dir, log lines to /dev/null), and per request the four messages Envoy sends for
the bench's chat completion (bench/run.py's CHAT_BODY and UPSTREAM_COMPLETION), each request
with its own x-request-id. `--stream`: the streamed request instead (`"stream": true`, the SSE
answer bench/run.py's nginx writes, in one piece as Envoy hands it over: the path its TTFB row
measures). `--profile` prints cProfile's top functions instead (`HOT_SORT=cumulative` sorts
by cumulative time; `HOT_DUMP=file` keeps the stats for `pstats`). `--cold 4` flushes 4 MB of
cache before each message, as Envoy's and the kernel's turns between messages do through
Envoy: the same logic then costs about what `bench/run.py` finds above the no-op floor.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import shutil
import sys
import tempfile
import time
from pathlib import Path

import orjson
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from gateway_extproc import audit, logs, render  # noqa: E402
from gateway_extproc.audit import signing  # noqa: E402
from gateway_extproc._proto.envoy.config.core.v3 import base_pb2  # noqa: E402
from gateway_extproc._proto.envoy.service.ext_proc.v3 import external_processor_pb2 as ep  # noqa: E402
from gateway_extproc.reload import RuntimeRef  # noqa: E402
from gateway_extproc.runtime import Runtime  # noqa: E402
from gateway_extproc.server import ExternalProcessor, quiet_collector  # noqa: E402

BODY = orjson.dumps(bench.CHAT_BODY)
REPLY = orjson.dumps(bench.UPSTREAM_COMPLETION)
STREAM_BODY = orjson.dumps({**bench.CHAT_BODY, "stream": True})
STREAM_REPLY = bench.sse_body().encode()


def runtime(tmp: Path) -> RuntimeRef:
    values = bench.chart_values([bench.VALUES_LOCAL])
    bench.lift_limits(values)
    values["audit"]["dir"] = str(tmp / "audit")
    values["audit"]["signingKey"]["file"] = str(tmp / "audit.key")
    signing.generate(tmp / "audit.key")
    (tmp / "values.yaml").write_text(yaml.safe_dump(values))
    render.render([tmp / "values.yaml"], tmp)
    os.environ.setdefault("MOCK_PROVIDER_API_KEY", bench.PROVIDER_KEY)
    return RuntimeRef(Runtime.load(str(tmp / "gateway.yaml")), str(tmp / "gateway.yaml"))


def _headers(pairs: dict[str, str]) -> ep.HttpHeaders:
    return ep.HttpHeaders(headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                                              for k, v in pairs.items()]))


def messages(i: int, stream: bool = False) -> list[ep.ProcessingRequest]:
    """What Envoy sends the router for one request (headers as Envoy 1.40 forwards them)."""
    body, reply = (STREAM_BODY, STREAM_REPLY) if stream else (BODY, REPLY)
    answered = {"content-type": "text/event-stream"} if stream else \
        {"content-type": "application/json", "content-length": str(len(reply))}
    return [
        ep.ProcessingRequest(request_headers=_headers({
            ":authority": "127.0.0.1:8080", ":path": "/v1/chat/completions", ":method": "POST", ":scheme": "http",
            "user-agent": "wrk", "content-type": "application/json", "authorization": f"Bearer {bench.DEMO_KEY}",
            "content-length": str(len(body)), "x-forwarded-proto": "http",
            "x-request-id": f"0b6f0c1e-4b7a-4a8e-9a57-{i:012d}"})),
        ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)),
        ep.ProcessingRequest(response_headers=_headers({
            ":status": "200", **answered, "x-gateway-backend": "private-openai", "x-envoy-upstream-service-time": "1"})),
        ep.ProcessingRequest(response_body=ep.HttpBody(body=reply, end_of_stream=True)),
    ]


class Flush:
    """Writes one byte in every cache line of `mb` megabytes: what Envoy, the gRPC core and the
    kernel do to the caches between two of a stream's messages through Envoy."""

    def __init__(self, mb: float) -> None:
        self.buf = bytearray(int(mb * 2**20))
        self.ones = b"\x01" * len(self.buf[::64])

    def __call__(self) -> None:
        self.buf[::64] = self.ones

    def cost(self, times: int) -> float:
        """CPU microseconds of one flush, the best of three batches of `times`."""
        best = float("inf")
        for _ in range(3):
            started = time.process_time()
            for _ in range(times):
                self()
            best = min(best, (time.process_time() - started) / times * 1e6)
        return best


async def one(server: ExternalProcessor, request: list[ep.ProcessingRequest], flush: Flush | None = None) -> None:
    async def stream():  # type: ignore[no-untyped-def]
        for m in request:
            if flush is not None:
                flush()
            yield m

    answers = [resp async for resp in server.Process(stream(), None)]  # type: ignore[arg-type]
    if len(answers) != 4 or any(a.HasField("immediate_response") for a in answers):
        raise RuntimeError(f"a request was not admitted: {answers[-1]}")


async def rounds(server: ExternalProcessor, requests: int, concurrency: int, first: int,
                 stream: bool = False, flush: Flush | None = None) -> float:
    """CPU microseconds per request (the whole process: the audit writer thread included).
    Envoy's messages are built before the clock starts: only the gateway's work is timed
    (with `flush`, the flushes' own cost is taken off)."""
    per_worker = requests // concurrency
    built = [[messages(first + w * requests + j, stream) for j in range(per_worker)] for w in range(concurrency)]

    async def worker(w: int) -> None:
        for request in built[w]:
            await one(server, request, flush)

    started = time.process_time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    spent = (time.process_time() - started) / (per_worker * concurrency) * 1e6
    return spent if flush is None else spent - 4 * flush.cost(200)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3, help="the figure is the best round (default 3)")
    p.add_argument("--concurrency", type=int, default=1, help="requests interleaved on the loop (default 1)")
    p.add_argument("--stream", action="store_true", help="the streamed request (bench/run.py's TTFB path)")
    p.add_argument("--profile", action="store_true", help="cProfile one round; print the top 40 by own time")
    p.add_argument("--cold", type=float, metavar="MB", help="flush MB of cache before each message (e.g. 4), "
                   "as Envoy's turns between messages do; the flushes' own cost is taken off")
    args = p.parse_args(argv)
    flush = Flush(args.cold) if args.cold else None
    tmp = Path(tempfile.mkdtemp(prefix="gw-hot-path-"))
    report = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # the access lines: written, as in `serve`, but not shown
    logs.configure("info")
    ref = runtime(tmp)
    audit.start(ref.current.config, 0)
    server = ExternalProcessor(ref)
    quiet_collector()  # as `serve` does before it serves
    try:
        async def run() -> list[float]:
            await rounds(server, 300, 1, 10**9, args.stream)  # warm-up: caches, first-use builds
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                await rounds(server, args.requests, args.concurrency, 0, args.stream, flush)
                prof.disable()
                if os.environ.get("HOT_DUMP"):
                    prof.dump_stats(os.environ["HOT_DUMP"])
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats(os.environ.get("HOT_SORT", "tottime")).print_stats(40)
                print(out.getvalue(), file=report)
                return []
            return [await rounds(server, args.requests, args.concurrency, (r + 1) * 10**7, args.stream, flush)
                    for r in range(args.rounds)]

        figures = uvloop.run(run())
    finally:
        audit.stop()
        shutil.rmtree(tmp, ignore_errors=True)  # the audit chain grows ~5 MB per round
    if figures:
        print(f"{min(figures):.1f} CPU-us per request in-process (best of {args.rounds}: "
              f"{', '.join(f'{f:.1f}' for f in figures)}), {args.requests} requests, "
              f"concurrency {args.concurrency}{', streamed' if args.stream else ''}"
              f"{f', {args.cold:g} MB flushed before each message' if flush else ''}", file=report)
    report.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
