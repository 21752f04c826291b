"""What the ext_proc's gRPC transport costs per request, and what a microsecond of Python
costs once it sits behind it (issue 16: "measured against the protocol floor").

    .venv/bin/python bench/transport_spike.py [--rounds 2] [--rate 900] [--burn 75]

Four no-op ext_procs on the gateway's rendered Envoy config (bench/run.py's floor stack), one
at a time, in alternating order over `--rounds` (ABCD, DCBA, ...):

- grpc.aio: bench/floor_extproc.py, the gateway's own stack (gRPC's C core: a poller thread
  and event-engine threads hand every completion to the event loop through a socket pair);
- grpclib: bench/floor_grpclib.py, the same answers over grpclib (HTTP/2 parsed in Python on
  the event loop: no thread between the socket and the handler);
- each again with `--burn` microseconds of main-thread CPU per message (FLOOR_BURN_US), a
  stand-in for the gateway's logic: 4 messages x 75 us = 300 us per request, about what the
  gateway's router spends in-process (bench/README.md).

Each gets wrk @1 (req/s, p50, CPU-ms/req), @32 unpaced (req/s, CPU-ms/req) and @32 paced to
`--rate` req/s (CPU-ms/req at the same throughput for all: the gateway's own rate is about
900 req/s here), and the context switches per request of its threads during the @32 run.
Results: bench/results/transport.json. Nothing here changes what the gateway runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from soak import CONNECTIONS  # noqa: E402

HERE = Path(__file__).resolve().parent
TRANSPORTS = {"grpc.aio": HERE / "floor_extproc.py", "grpclib": HERE / "floor_grpclib.py"}
RESULT = HERE / "results" / "transport.json"


def switches(pid: int) -> int:
    """Voluntary + involuntary context switches of every thread of pid."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (task / "status").read_text().splitlines():
                if "ctxt_switches:" in line:  # voluntary_ and nonvoluntary_
                    total += int(line.split()[-1])
        except OSError:
            continue
    return total


def measure(tmp: Path, nginx_port: int, transport: str, burn_us: float, rate: float) -> dict:
    os.environ["FLOOR_BURN_US"] = str(burn_us)  # read by the floor at start (spawn passes os.environ)
    tag = f"{transport}-{burn_us:g}".replace(".", "")
    with bench.floor_stack(tmp, nginx_port, TRANSPORTS[transport], tag) as (url, pid, _envoy):
        script = bench.wrk_script(tmp, "private-chat")
        bench.run_wrk(url, script, CONNECTIONS, 2)  # warm-up
        at1 = bench.run_wrk(url, script, 1, 6, {"x": lambda: [pid]})
        before = switches(pid)
        at32 = bench.run_wrk(url, script, CONNECTIONS, 8, {"x": lambda: [pid]})
        per_req_switches = (switches(pid) - before) / at32.requests
        pace = bench.paced(url, tmp, rate, 6, {"x": lambda: [pid]})
    os.environ.pop("FLOOR_BURN_US", None)

    def cpu(load: bench.Load) -> float:
        return load.cpu_s["x"] * 1000 / load.requests

    return {"transport": transport, "burn_us_per_message": burn_us,
            "at1": {"rps": at1.rps, "p50_ms": at1.p50_ms, "cpu_ms_per_req": cpu(at1)},
            "at32": {"rps": at32.rps, "cpu_ms_per_req": cpu(at32), "context_switches_per_req": per_req_switches},
            "paced": {"rps": pace.rps, "cpu_ms_per_req": cpu(pace)}}


def table(rows: list[dict]) -> str:
    keys = sorted({(r["transport"], r["burn_us_per_message"]) for r in rows}, key=lambda k: (k[1], k[0]))
    out = ["| ext_proc (no-op) | Python per request | @1 req/s | @1 p50 ms | @1 CPU-ms/req | @32 req/s "
           "| @32 CPU-ms/req | ctx switches/req @32 | paced req/s | paced CPU-ms/req |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for transport, burn in keys:
        rs = [r for r in rows if (r["transport"], r["burn_us_per_message"]) == (transport, burn)]

        def mean(path: str, field: str) -> float:
            return sum(r[path][field] for r in rs) / len(rs)

        out.append(f"| {transport} | {4 * burn:g} us | {mean('at1', 'rps'):,.0f} | {mean('at1', 'p50_ms'):.2f} "
                   f"| {mean('at1', 'cpu_ms_per_req'):.3f} | {mean('at32', 'rps'):,.0f} "
                   f"| {mean('at32', 'cpu_ms_per_req'):.3f} | {mean('at32', 'context_switches_per_req'):.1f} "
                   f"| {mean('paced', 'rps'):,.0f} | {mean('paced', 'cpu_ms_per_req'):.3f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rate", type=float, default=900.0, help="paced runs' target req/s (default 900)")
    p.add_argument("--burn", type=float, default=75.0, help="us of Python per message in the burn rows (default 75)")
    args = p.parse_args(argv)
    bench.require_tools()
    order = [(t, b) for b in (0.0, args.burn) for t in TRANSPORTS]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="gw-transport-"))
    try:
        with bench.nginx(tmp) as (nginx_port, _nginx):
            for i in range(args.rounds):
                for transport, burn in (order if i % 2 == 0 else order[::-1]):
                    row = measure(tmp, nginx_port, transport, burn, args.rate)
                    rows.append(row)
                    print(f"round {i + 1}: {transport}, {burn:g} us/message: @1 {row['at1']['p50_ms']:.2f} ms p50, "
                          f"@32 {row['at32']['rps']:,.0f} req/s {row['at32']['cpu_ms_per_req']:.3f} CPU-ms/req, "
                          f"paced {row['paced']['rps']:,.0f} req/s {row['paced']['cpu_ms_per_req']:.3f}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = table(rows)
    print("\n" + text)
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                  "source": bench.source_version(), "settings": vars(args), "rows": rows,
                                  "table": text}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
