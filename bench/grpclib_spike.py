"""The gateway on grpclib next to the gateway on grpc.aio, in one run (issue 16's stack proposal).

    .venv/bin/python bench/grpclib_spike.py [--rounds 2] [--seconds 6] [--warmup 2]

Same nginx, same rendered values-local config (one ext_proc process, budgets in memory, limits
lifted as bench/run.py does), in alternating order over `--rounds`:

- plain Envoy, and the no-op floor (bench/floor_extproc.py: grpc.aio) the issue's ratios use;
- the gateway as shipped: `gateway-extproc serve`, one grpc.aio worker;
- the same gateway logic on grpclib: bench/grpclib_gateway.py.

Each gateway first answers the same set of requests (ordinary, fallback, streamed through the
openai SDK, a 1 MB prompt, a card number, a bad key, malformed JSON, an unknown model); the
spike stops if the two differ in status, error code or streamed text. Then bench/run.py's
`measure` (wrk @1 and @32, streamed TTFB) for private-chat and fallback-chat, and the issue's
five targets for both. Results: bench/results/grpclib_spike.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402
from gateway_extproc.localstack import LocalStack, _listen  # noqa: E402
from gateway_extproc import sockets  # noqa: E402

HERE = Path(__file__).resolve().parent
GRPCLIB_WORKER = HERE / "grpclib_gateway.py"
RESULT = HERE / "results" / "grpclib_spike.json"
MODELS = ("private-chat", "fallback-chat")


class GrpclibStack(LocalStack):
    """LocalStack with bench/grpclib_gateway.py as its one ext_proc process."""

    def start_extproc(self) -> None:
        self._spawn("extproc", [sys.executable, str(GRPCLIB_WORKER), str(self.workdir / "gateway.yaml")])
        addresses = _listen(self.workdir / "gateway.yaml")
        self._wait("extproc", lambda: all(sockets.listening(a) for a in addresses), "ext_proc socket")


def stack(kind: str, tmp: Path, nginx_port: int, tag: str) -> LocalStack:
    values = bench.gateway_values(nginx_port, tmp, 1, None, tag)
    cls = GrpclibStack if kind == "grpclib" else LocalStack
    return cls(values, tmp / f"gateway-{tag}", env={"MOCK_PROVIDER_API_KEY": bench.PROVIDER_KEY}, mocks={})


def extproc_pids(kind: str, s: LocalStack) -> Callable[[], list[int]]:
    pid = s.procs["extproc"].pid
    return (lambda: [pid]) if kind == "grpclib" else (lambda: bench.children(pid))


# -- the same answers ----------------------------------------------------------------------------


def _error_code(r: httpx.Response) -> str | None:
    try:
        return r.json()["error"]["code"]
    except Exception:  # noqa: BLE001 - a success, or not JSON
        return None


def answers(url: str) -> dict[str, object]:
    """What the gateway says to a set of ordinary and awkward requests (compared across transports)."""
    chat = f"{url}/v1/chat/completions"
    h = bench.headers()

    def body(model: str = "private-chat", content: str | None = None) -> dict:
        b = json.loads(json.dumps(bench.CHAT_BODY))
        b["model"] = model
        if content is not None:
            b["messages"][-1]["content"] = content
        return b

    out: dict[str, object] = {}
    with httpx.Client(timeout=60) as c:
        for name, kw in {
            "ordinary": {"json": body()},
            "fallback": {"json": body("fallback-chat")},
            "1 MB prompt": {"json": body(content="lorem ipsum dolor " * 58255)},
            "card number": {"json": body(content="charge my card 4111 1111 1111 1111 please")},
            "malformed JSON": {"content": b'{"model": "private-chat", "messages": ['},
            "unknown model": {"json": body("no-such-model")},
        }.items():
            r = c.post(chat, headers=h, **kw)
            out[name] = [r.status_code, _error_code(r)]
        r = c.post(chat, headers={**h, "authorization": "Bearer gwk_demo_wrong"}, json=body())
        out["bad key"] = [r.status_code, _error_code(r)]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=bench.DEMO_KEY, max_retries=0)
    for model in MODELS:
        stream = client.chat.completions.create(model=model, messages=bench.CHAT_BODY["messages"], stream=True,
                                                extra_headers={"x-bench-stream": "1"})
        out[f"streamed {model}"] = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    return out


# -- measurement --------------------------------------------------------------------------------


def measure_gateway(kind: str, tmp: Path, nginx_port: int, nginx_pids: Callable[[], list[int]], seconds: float,
                    warmup: float, tag: str, seen: dict[str, object]) -> list[bench.PathResult]:
    with bench.running(stack(kind, tmp, nginx_port, tag)) as s:
        said = answers(s.url)
        if "answers" in seen and seen["answers"] != said:
            raise SystemExit(f"grpclib_spike: the two transports answer differently:\n{seen['answers']}\n{said}")
        seen["answers"] = said
        cpu_of = {"extproc": extproc_pids(kind, s), "envoy": lambda p=s.procs["envoy"].pid: [p], "nginx": nginx_pids}
        return [bench.measure(bench.Target(f"gateway {model}, {kind}", "gateway", s.url, model, cpu_of, 1),
                              tmp, seconds, warmup) for model in MODELS]


def targets(gw: dict[str, bench.PathResult], floor: dict[str, bench.PathResult], plain: bench.PathResult
            ) -> list[tuple[str, float, float, str]]:
    """The issue's five targets: (what, figure, target, PASS/MISS)."""
    pc, fc, fl = gw["private-chat"], gw["fallback-chat"], floor["private-chat"]
    rows = [("private-chat CPU-ms/req ÷ no-op floor", pc.extproc_cpu_ms_per_req / fl.extproc_cpu_ms_per_req, 1.5,
             "le"),
            ("private-chat req/s @32 ÷ plain Envoy", pc.ratio(plain), 0.08, "ge"),
            ("private-chat added p50 @1 (ms)", pc.added_p50(plain), 1.5, "le"),
            ("fallback-chat CPU-ms/req ÷ private-chat", fc.extproc_cpu_ms_per_req / pc.extproc_cpu_ms_per_req, 1.3,
             "le"),
            ("streamed TTFB added (ms)", pc.ttfb_added(plain), 2.0, "le")]
    return [(what, fig, tgt, "PASS" if (fig <= tgt if how == "le" else fig >= tgt) else "MISS")
            for what, fig, tgt, how in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seconds", type=float, default=6.0, help="seconds per wrk run (default 6)")
    p.add_argument("--warmup", type=float, default=2.0)
    args = p.parse_args(argv)
    bench.require_tools()
    runs: dict[str, list[bench.PathResult]] = {}
    seen: dict[str, object] = {}
    tmp = Path(tempfile.mkdtemp(prefix="gw-grpclib-spike-"))
    try:
        with bench.nginx(tmp) as (nginx_port, nginx_proc):
            nginx_pids = lambda: [nginx_proc.pid, *bench.children(nginx_proc.pid)]  # noqa: E731
            limit = bench.chart_values([bench.VALUES_LOCAL])["envoy"]["maxRequestBytes"] + 1048576
            order = ["plain", "floor", "grpc.aio", "grpclib"]
            for i in range(args.rounds):
                for kind in (order if i % 2 == 0 else order[::-1]):
                    bench.wait_for_quiet()
                    if kind == "plain":
                        got = [bench.plain_round(tmp, nginx_port, nginx_pids, limit, args.seconds, args.warmup)]
                    elif kind == "floor":
                        got = bench.measure_floor(tmp, nginx_port, nginx_pids, args.seconds, args.warmup)
                    else:
                        got = measure_gateway(kind, tmp, nginx_port, nginx_pids, args.seconds, args.warmup,
                                              f"{kind}-{i}", seen)
                    for model, r in zip(MODELS, got):  # plain: private-chat only
                        runs.setdefault(kind if kind == "plain" else f"{kind} {model}", []).append(r)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mean = {k: bench.mean_result(v) for k, v in runs.items()}
    plain = mean["plain"]
    floor = {m: mean[f"floor {m}"] for m in MODELS}
    print("\n" + bench.table(list(mean.values()), plain))
    report: dict[str, object] = {}
    for kind in ("grpc.aio", "grpclib"):
        rows = targets({m: mean[f"{kind} {m}"] for m in MODELS}, floor, plain)
        report[kind] = [{"target": w, "figure": round(f, 3), "limit": t, "result": r} for w, f, t, r in rows]
        print(f"\n{kind}:\n| target | figure | limit | result |\n|---|---:|---:|---|")
        for w, f, t, r in rows:
            print(f"| {w} | {f:.3f} | {t:g} | {r} |")
    print("\nsame answers on both transports:", json.dumps(seen.get("answers"))[:400])
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps({
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "source": bench.source_version(),
        "settings": vars(args), "answers": seen.get("answers"), "targets": report,
        "paths": {k: {"rps_at32": r.at32.rps, "rps_at1": r.at1.rps, "p50_at1_ms": r.at1.p50_ms,
                      "p99_at32_ms": r.at32.p99_ms, "ttfb_ms": r.ttfb_ms,
                      "extproc_cpu_ms_per_req": r.extproc_cpu_ms_per_req,
                      "envoy_cpu_ms_per_req": r.envoy_cpu_ms_per_req,
                      "rounds_extproc_cpu": [x.extproc_cpu_ms_per_req for x in r.rounds]} for k, r in mean.items()},
    }, indent=2) + "\n")
    print(f"\nwritten: {RESULT.relative_to(bench.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
