"""What a streamed answer costs per chunk, through real Envoy: ext_proc and Envoy CPU per
chunk of a long stream from the repo's mock provider (issue 16: a real provider streams
about one chunk per token, where bench/run.py's nginx writes its short stream in one piece).

    .venv/bin/python bench/stream_chunks.py [--words 300] [--streams 20] [--delay-ms 1] [--concurrency 1]
                                            [--transport grpcio|grpclib]

private-chat on values-local as bench/run.py runs it (1 ext_proc process, budgets in memory,
output scanning on), backed by the mock provider, which writes one word per chunk
`--delay-ms` apart (apart enough that Envoy hands each chunk to the ext_proc on its own:
the script counts the messages Envoy sent). `--concurrency` streams at a time (1: one
after another) through the openai SDK; the figure is the CPU of the ext_proc's processes
and of Envoy over those streams, divided by the chunks Envoy's ext_proc filter sent the router. `--transport
grpclib`: the same gateway logic served over grpclib (bench/grpclib_gateway.py, the stack
proposal's spike; needs the `bench` extra). For comparing trees, run it with
`PYTHONPATH=<export>` as bench/README's Reproduce says, alternated.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpclib_spike  # noqa: E402
import run as bench  # noqa: E402

WORDS = ("the load balancer in front of the warehouse closes idle connections after forty minutes so "
         "check its timeout then the write size of the largest partition and the pool settings").split()


def router_messages(admin: str) -> int:
    """Messages Envoy's router-level ext_proc filter has sent (its stats prefix: the chart's)."""
    text = httpx.get(f"{admin}/stats", params={"filter": "ext_proc"}, timeout=5).text
    return sum(int(m.group(1)) for m in re.finditer(r"^http\.[^\n]*ext_proc[^\n]*\.stream_msgs_sent: (\d+)$",
                                                     text, re.M))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--words", type=int, default=300)
    p.add_argument("--streams", type=int, default=20)
    p.add_argument("--delay-ms", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--transport", choices=("grpcio", "grpclib"), default="grpcio")
    args = p.parse_args(argv)
    reply = " ".join(WORDS[i % len(WORDS)] for i in range(args.words))
    hdrs = {"x-mock-reply": reply, "x-mock-chunk-delay-ms": str(args.delay_ms)}
    with tempfile.TemporaryDirectory(prefix="gw-stream-chunks-") as d, bench.mock_provider(Path(d)) as port, \
            bench.running(grpclib_spike.stack(args.transport, Path(d), port, f"chunks-{args.transport}")) as stack:
        extproc, envoy = grpclib_spike.extproc_pids(args.transport, stack), stack.procs["envoy"].pid
        admin = stack.admin_url
        client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=bench.DEMO_KEY, max_retries=0)

        def one() -> str:
            chunks = client.chat.completions.create(model=bench.VARIANT_MODEL, stream=True, extra_headers=hdrs,
                                                    messages=[{"role": "user", "content": "Where do I start?"}])
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        for _ in range(3):  # warm-up
            if one() != reply:
                raise RuntimeError("the stream did not arrive whole")
        sent0, ext0, env0 = router_messages(admin), bench.cpu_seconds(extproc()), bench.cpu_seconds([envoy])
        with ThreadPoolExecutor(args.concurrency) as pool:
            if any(text != reply for text in pool.map(lambda _: one(), range(args.streams))):
                raise RuntimeError("a stream did not arrive whole")
        sent = router_messages(admin) - sent0
        ext = bench.cpu_seconds(extproc()) - ext0
        env = bench.cpu_seconds([envoy]) - env0
    chunks = sent - 3 * args.streams  # (request headers and body, response headers: the rest are chunks)
    print(f"{args.transport}, {args.streams} streams of {args.words} words, {args.concurrency} at a time: "
          f"{chunks / args.streams:.0f} chunks each reached the ext_proc; "
          f"per chunk: ext_proc {ext / chunks * 1e6:.0f} us CPU, Envoy {env / chunks * 1e6:.0f} us CPU "
          f"(per stream: ext_proc {ext / args.streams * 1e3:.1f} ms, Envoy {env / args.streams * 1e3:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
