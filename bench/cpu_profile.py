"""Where the ext_proc's CPU goes, and how many ext_proc messages each request shape costs.

    .venv/bin/python bench/cpu_profile.py [--seconds 20] [--connections 32] [--native] [--label NAME]

Starts the bench's fake provider (nginx) and the gateway from helm/values-local.yaml with
one ext_proc process and budgets in memory (as bench/run.py's main gateway row), then:

1. **Messages per request shape.** Envoy's own ext_proc counters (`streams_started`,
   `stream_msgs_sent`, `stream_msgs_received`, router filter and each cluster's upstream
   filter apart) read from its admin `/stats` before and after 20 sequential requests of
   each shape: private-chat JSON, private-chat streamed, fallback-chat JSON, fallback-chat
   streamed (fallback-chat's upstream ext_proc runs once per attempt; here one attempt).
2. **Profile.** wrk drives private-chat JSON at `--connections` for `--seconds` while py-spy
   samples the ext_proc worker (`--nonblocking`, the worker is never paused; or `--native`,
   which adds the C frames of gRPC and protobuf but pauses the worker for each sample). Each sample goes to one *area* by its innermost
   frame that names one (a call from the scanner into `re` counts as scanner; the
   processors' own lines count as processors), and to the *phase* (ext_proc message kind)
   whose handler is on its stack.

Prints markdown tables and writes them with the raw numbers to
bench/results/profile-<label>.json. The CPU-ms/req printed is measured under py-spy, so
compare it within this tool only; bench/run.py gives the figures to quote.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run as bench  # noqa: E402  (bench/run.py: nginx, gateway stack, wrk, /proc CPU)

RESULTS_DIR = bench.ROOT / "bench" / "results"
SAMPLES_PER_SHAPE = 20

# Innermost matching frame wins; first pattern that matches a frame names its area.
# py-spy frames read "function (path:line)"; native ones "symbol (library)".
AREAS: tuple[tuple[str, re.Pattern[str]], ...] = tuple((name, re.compile(p)) for name, p in (
    ("tokenizer", r"gateway_extproc/tokens\.py|bpe_openai|tiktoken|tokenizers"),
    ("scanner/policy", r"gateway_extproc/policy/"),
    ("budgets", r"gateway_extproc/budgets/"),
    ("metrics", r"gateway_extproc/telemetry/metrics\.py|prometheus_client"),
    ("tracing", r"gateway_extproc/telemetry/tracing\.py|opentelemetry"),
    ("logging (structlog, access log)", r"structlog|gateway_extproc/logs\.py|/logging/|\baccess_log\b"),
    ("audit", r"gateway_extproc/audit/"),
    ("identity", r"gateway_extproc/(identity|keystore|keys)\.py"),
    ("protobuf (build/read messages)", r"google/protobuf|_pb2\.py|_upb|upb_|processors/responses\.py"),
    ("JSON (orjson)", r"orjson|/json/"),
    ("our processors", r"gateway_extproc/"),
    ("gRPC runtime (Python side)", r"grpc/_cython|grpc/aio|cygrpc|grpc/_"),
    ("asyncio / uvloop", r"asyncio/|uvloop"),
    ("gRPC runtime (native)", r"grpc_|gpr_|absl|libgrpc|cygrpc\.cpython|_cygrpc"),
    ("syscalls (send/recv/epoll)", r"^(__)?(libc_)?(sendmsg|recvmsg|write|read|epoll_wait|epoll_pwait|writev|"
                                   r"send|recv|futex|syscall|poll|__GI_)"),
))
PHASES = ("request_headers", "request_body", "response_headers", "response_body")
_PHASE = re.compile(r"^(?:\w+\.)?(request_headers|request_body|response_headers|response_body) "
                    r"\(gateway_extproc/processors/")
# Without --native, a sample whose innermost Python frame is the event loop's run call was
# in C below it: uvloop, grpc.aio's completion queue, the syscalls of the gRPC transport.
_BELOW_LOOP = re.compile(r"^(Runner\.run \(asyncio/runners\.py|run \(uvloop/)")
_IDLE = re.compile(r"^(Condition\.wait|Event\.wait) \(threading\.py")


def area_of(stack: list[str]) -> str:
    if stack and _BELOW_LOOP.match(stack[-1]):
        return "event loop + gRPC transport (C, below Python)"
    for frame in reversed(stack):  # innermost first
        for name, pattern in AREAS:
            if pattern.search(frame):
                return name
    return "other (interpreter, stdlib)"


def phase_of(stack: list[str]) -> str | None:
    for frame in stack:
        m = _PHASE.match(frame)
        if m:
            return m.group(1)
    return None


def summarise(raw: str) -> dict[str, object]:
    """py-spy `--format raw --threads` output: "thread (..);outer;...;inner COUNT" per line."""
    areas: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    phases: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack_text.split(";")
        thread, stack = frames[0].partition(": ")[2], frames[1:]
        if thread != "MainThread":
            # gRPC's poller thread waits in epoll (py-spy cannot tell that wait from work);
            # the audit writer sleeps between batches.
            idle = any(_IDLE.match(f) for f in stack[-1:])
            threads[f"{thread.split(' ')[0]}{' (waiting)' if idle else ''}"] += count
            continue
        areas[area_of(stack)] += count
        phases[phase_of(stack) or "outside a phase handler"] += count
        total += count
    return {"samples": total, "areas": dict(areas), "phases": dict(phases), "other_threads": dict(threads)}


def _pct(n: int, total: int) -> str:
    return f"{100 * n / total:.1f}%" if total else "–"


def area_table(summary: dict[str, object]) -> str:
    """The main thread (the event loop: gRPC and all our code) by area; other threads' samples
    as a count beside it."""
    areas: dict[str, int] = summary["areas"]  # type: ignore[assignment]
    total = int(summary["samples"])  # type: ignore[arg-type]
    lines = ["| area (main thread) | share of samples |", "|---|---:|"]
    for name, n in Counter(areas).most_common():
        lines.append(f"| {name} | {_pct(n, total)} |")
    others = summary["other_threads"]  # type: ignore[assignment]
    lines.append(f"| samples (main thread) | {total} |")
    lines.append("| other threads' samples | " + ", ".join(f"{k} {v}" for k, v in others.items()) + " |")  # type: ignore[union-attr]
    return "\n".join(lines)


def phase_table(summary: dict[str, object]) -> str:
    phases: dict[str, int] = summary["phases"]  # type: ignore[assignment]
    total = int(summary["samples"])  # type: ignore[arg-type]
    lines = ["| phase handler on the stack | share of samples |", "|---|---:|"]
    for name in (*PHASES, "outside a phase handler"):
        lines.append(f"| {name} | {_pct(phases.get(name, 0), total)} |")
    return "\n".join(lines)


# -- messages per request shape ---------------------------------------------------------------

_COUNTERS = ("streams_started", "stream_msgs_sent", "stream_msgs_received")


def extproc_stats(admin_url: str) -> dict[str, int]:
    """Envoy's ext_proc counters by filter: "router" (the HTTP connection manager's filter)
    or the cluster whose upstream filter it is."""
    text = httpx.get(f"{admin_url}/stats", params={"filter": r"ext_proc\."}, timeout=5).text
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        counter = name.rsplit(".", 1)[-1]
        if counter not in _COUNTERS or not value.strip().isdigit():
            continue
        where = "upstream" if name.startswith("cluster.") else "router"
        out[f"{where}.{counter}"] = out.get(f"{where}.{counter}", 0) + int(value)
    return out


def messages_per_shape(url: str, admin_url: str) -> list[dict[str, object]]:
    shapes = [("private-chat, JSON", "private-chat", False), ("private-chat, streamed", "private-chat", True),
              ("fallback-chat, JSON", "fallback-chat", False), ("fallback-chat, streamed", "fallback-chat", True)]
    rows = []
    with httpx.Client(timeout=10) as client:
        for label, model, stream in shapes:
            body = json.dumps({**bench.CHAT_BODY, "model": model, "stream": stream}).encode()
            client.post(f"{url}/v1/chat/completions", content=body, headers=bench.headers(stream)).raise_for_status()
            time.sleep(0.3)  # let the warm-up request's streams close
            before = extproc_stats(admin_url)
            for _ in range(SAMPLES_PER_SHAPE):
                r = client.post(f"{url}/v1/chat/completions", content=body, headers=bench.headers(stream))
                r.raise_for_status()
            time.sleep(0.3)
            after = extproc_stats(admin_url)
            per = {k: (after.get(k, 0) - before.get(k, 0)) / SAMPLES_PER_SHAPE for k in after}
            rows.append({"shape": label, **per})
    return rows


def messages_table(rows: list[dict[str, object]]) -> str:
    lines = ["| request shape | router streams | router msgs sent / received | upstream streams "
             "| upstream msgs sent / received | messages per request (both ways) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        def g(k: str) -> float:
            return float(r.get(k, 0.0))  # type: ignore[arg-type]
        total = sum(g(f"{w}.{c}") for w in ("router", "upstream") for c in ("stream_msgs_sent", "stream_msgs_received"))
        lines.append(f"| {r['shape']} | {g('router.streams_started'):g} | {g('router.stream_msgs_sent'):g} / "
                     f"{g('router.stream_msgs_received'):g} | {g('upstream.streams_started'):g} | "
                     f"{g('upstream.stream_msgs_sent'):g} / {g('upstream.stream_msgs_received'):g} | {total:g} |")
    return "\n".join(lines)


# -- CPU by thread ----------------------------------------------------------------------------


def thread_cpu(pid: int) -> dict[str, float]:
    """utime+stime seconds of each thread of pid, by thread name (/proc/PID/task/TID)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / bench._TICK
    return out


def thread_table(before: dict[str, float], after: dict[str, float], requests: int) -> str:
    lines = ["| ext_proc thread | CPU-ms/req | share |", "|---|---:|---:|"]
    spent = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    total = sum(spent.values())
    for name, cpu in sorted(spent.items(), key=lambda kv: -kv[1]):
        if cpu > 0:
            lines.append(f"| {name} | {cpu * 1000 / requests:.3f} | {_pct(int(cpu * 1000), int(total * 1000))} |")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def py_spy() -> str:
    found = Path(sys.executable).parent / "py-spy"
    path = str(found) if found.exists() else shutil.which("py-spy")
    if path is None:
        print("cpu_profile: py-spy not found: `.venv/bin/pip install -e '.[bench]'`", file=sys.stderr)
        sys.exit(2)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=20, help="profiled wrk run (default 20)")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames of gRPC and protobuf too")
    p.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    p.add_argument("--label", default="latest", help="results go to bench/results/profile-<label>.json")
    p.add_argument("--raw", type=Path, help="also keep py-spy's collapsed stacks in this file")
    args = p.parse_args(argv)
    bench.require_tools()
    spy = py_spy()
    tmp = Path(tempfile.mkdtemp(prefix="gw-profile-"))
    try:
        with bench.nginx(tmp) as (nginx_port, _nginx), bench.gateway(tmp, nginx_port, 1, None) as stack:
            bench.preflight(stack.url, "private-chat", "gateway")
            rows = messages_per_shape(stack.url, stack.admin_url)
            print("ext_proc messages per request (Envoy's counters, "
                  f"{SAMPLES_PER_SHAPE} sequential requests per shape):\n\n" + messages_table(rows) + "\n", flush=True)
            [worker] = bench.children(stack.procs["extproc"].pid)
            script = bench.wrk_script(tmp, "private-chat")
            bench.run_wrk(stack.url, script, args.connections, 2)  # warm-up
            # CPU by thread without the profiler: the main thread runs the event loop and all
            # our code; grpc.aio's poller thread runs gRPC's C core; the rest are ours.
            threads_before = thread_cpu(worker)
            plain = bench.run_wrk(stack.url, script, args.connections, args.seconds,
                                  {"extproc": lambda: [worker], "envoy": lambda: [stack.procs["envoy"].pid]})
            threads = thread_table(threads_before, thread_cpu(worker), plain.requests)
            print(f"without the profiler: {plain.rps:,.0f} req/s @{args.connections}, ext_proc "
                  f"{plain.cpu_s['extproc'] * 1000 / plain.requests:.3f} CPU-ms/req, Envoy "
                  f"{plain.cpu_s['envoy'] * 1000 / plain.requests:.3f}\n\n{threads}\n", flush=True)
            out = tmp / "profile.raw"
            argv_spy = [spy, "record", "-p", str(worker), "-r", str(args.rate), "-d", str(int(args.seconds) + 1),
                        "--format", "raw", "--threads", "-o", str(out)]
            # py-spy reads native stacks only from a paused process; Python stacks without pausing.
            argv_spy.append("--native" if args.native else "--nonblocking")
            spy_proc = subprocess.Popen(argv_spy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            time.sleep(0.5)
            load = bench.run_wrk(stack.url, script, args.connections, args.seconds,
                                 {"extproc": lambda: [worker], "envoy": lambda: [stack.procs["envoy"].pid]})
            _, err = spy_proc.communicate(timeout=60)
            if not out.exists():
                raise RuntimeError(f"py-spy wrote nothing: {err.decode(errors='replace')[-2000:]}")
            summary = summarise(out.read_text())
            if args.raw:
                shutil.copy(out, args.raw)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cpu_ms = load.cpu_s["extproc"] * 1000 / load.requests
    print(f"profiled: {load.rps:,.0f} req/s @{args.connections}, ext_proc {cpu_ms:.3f} CPU-ms/req under py-spy "
          f"({'native frames' if args.native else 'Python frames'}, {args.rate} Hz)\n")
    print("Main-thread samples by area (innermost frame that names one):\n\n" + area_table(summary) + "\n")
    print("Samples by ext_proc phase:\n\n" + phase_table(summary) + "\n")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    result = RESULTS_DIR / f"profile-{args.label}.json"
    result.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": bench.source_version(),
        "settings": {"seconds": args.seconds, "connections": args.connections, "native": args.native,
                     "rate": args.rate},
        "load": {"rps": load.rps, "requests": load.requests, "extproc_cpu_ms_per_req_under_py_spy": cpu_ms},
        "without_profiler": {"rps": plain.rps, "requests": plain.requests, "cpu_s": plain.cpu_s},
        "messages_per_request": rows, "profile": summary,
        "tables": {"messages": messages_table(rows), "threads": threads, "areas": area_table(summary), "phases": phase_table(summary)},
    }, indent=2) + "\n")
    print(f"raw numbers: {result.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
