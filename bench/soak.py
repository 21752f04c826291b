"""Soak: the bench's private-chat path held at half its measured maximum rate for 10 minutes.

    .venv/bin/python bench/soak.py [--minutes 10] [--warmup 60] [--rate-fraction 0.5] [--keep]

Same setup as bench/run.py (its helpers, imported): nginx as the fake provider, the gateway
stack from helm/values-local.yaml with one ext_proc process and budgets in memory, wrk with
32 connections sending the bench's chat request to private-chat. First the maximum is
measured (wrk @32 unpaced, after a warm-up); then wrk runs paced at `--rate-fraction` of it
(each connection waits between requests; the wait is corrected after every minute so the
achieved rate stays on target), one wrk run per minute, so every minute has its own p50,
p99, errors, CPU and the RSS of the ext_proc processes and Envoy at its end.

Passes when, after the warm-up: the ext_proc's and Envoy's RSS grow by at most 5%, the
p99 stays steady (no minute's p99 above twice the median of the per-minute p99s), and
no request fails (non-2xx or socket error). Raw numbers go to bench/results/soak.json;
bench/SOAK.md holds the last full run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (bench/run.py: the same stack, load and accounting helpers)

RESULTS = bench.ROOT / "bench" / "results" / "soak.json"
CONNECTIONS = 32
MODEL = "private-chat"
MAX_RSS_GROWTH = 0.05
P99_STEADY_FACTOR = 2.0  # no minute's p99 above this multiple of the median minute's


def rss_kib(pids: list[int]) -> int:
    """Resident set size of these processes, summed (VmRSS from /proc)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def soak(tmp: Path, minutes: int, warmup_s: float, fraction: float, segment_s: float = 60) -> dict:
    with bench.nginx(tmp) as (nginx_port, _nginx), bench.gateway(tmp, nginx_port, 1, None) as stack:
        serve_pid, envoy_pid = stack.procs["extproc"].pid, stack.procs["envoy"].pid
        extproc = lambda: [serve_pid, *bench.children(serve_pid)]  # noqa: E731
        cpu_of = {"extproc": extproc, "envoy": lambda: [envoy_pid]}
        bench.preflight(stack.url, MODEL, "gateway")
        script = bench.wrk_script(tmp, MODEL)
        bench.run_wrk(stack.url, script, CONNECTIONS, 5)
        peak = bench.run_wrk(stack.url, script, CONNECTIONS, 15, cpu_of)
        target = peak.rps * fraction
        print(f"soak: maximum {peak.rps:,.0f} req/s @{CONNECTIONS}; holding {target:,.0f} req/s "
              f"for {warmup_s:g} s warm-up + {minutes} min", flush=True)
        delay_ms = CONNECTIONS / target * 1000  # refined below from each run's achieved rate

        def paced_run(seconds: float) -> bench.Load:
            nonlocal delay_ms
            load = bench.run_wrk(stack.url, bench.paced_script(tmp, delay_ms, MODEL), CONNECTIONS, seconds, cpu_of,
                                 check=False)
            delay_ms = bench.next_delay(delay_ms, target, load.rps)
            return load

        warm = paced_run(warmup_s)
        base = {"extproc": rss_kib(extproc()), "envoy": rss_kib([envoy_pid])}
        print(f"  warm-up: {warm.rps:,.0f} req/s, p99 {warm.p99_ms:.2f} ms; RSS ext_proc "
              f"{base['extproc'] / 1024:.1f} MiB, Envoy {base['envoy'] / 1024:.1f} MiB", flush=True)
        rows = []
        for minute in range(1, minutes + 1):
            load = paced_run(segment_s)
            rss = {"extproc": rss_kib(extproc()), "envoy": rss_kib([envoy_pid])}
            row = {"minute": minute, "requests": load.requests, "rps": round(load.rps, 1),
                   "p50_ms": load.p50_ms, "p99_ms": load.p99_ms, "errors": load.non_2xx + load.socket_errors,
                   "extproc_cpu_ms_per_req": round(load.cpu_s["extproc"] * 1000 / max(1, load.requests), 3),
                   "envoy_cpu_ms_per_req": round(load.cpu_s["envoy"] * 1000 / max(1, load.requests), 3),
                   "other_cores": round(bench.other_cores(load), 2),
                   "rss_extproc_kib": rss["extproc"], "rss_envoy_kib": rss["envoy"]}
            rows.append(row)
            print(f"  minute {minute:2d}: {row['rps']:7,.0f} req/s  p50 {row['p50_ms']:6.2f} ms  "
                  f"p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  ext_proc {row['extproc_cpu_ms_per_req']:.3f} "
                  f"CPU-ms/req  RSS ext_proc {rss['extproc'] / 1024:.1f} MiB, Envoy {rss['envoy'] / 1024:.1f} MiB  "
                  f"(other processes: {row['other_cores']:.2f} cores)",
                  flush=True)
        return {"peak_rps": round(peak.rps, 1), "target_rps": round(target, 1), "warmup_s": warmup_s,
                "warmup": {"rps": round(warm.rps, 1), "p99_ms": warm.p99_ms}, "rss_after_warmup_kib": base,
                "minutes": rows}


def verdict(result: dict) -> list[tuple[bool, str]]:
    rows, base = result["minutes"], result["rss_after_warmup_kib"]
    out = []
    for who in ("extproc", "envoy"):
        end = rows[-1][f"rss_{who}_kib"]
        growth = end / base[who] - 1
        out.append((growth <= MAX_RSS_GROWTH, f"{who} RSS {base[who] / 1024:.1f} -> {end / 1024:.1f} MiB "
                                              f"({growth:+.1%}; limit +{MAX_RSS_GROWTH:.0%})"))
    p99s = [r["p99_ms"] for r in rows]
    median = statistics.median(p99s)
    out.append((max(p99s) <= P99_STEADY_FACTOR * median,
                f"p99 per minute {min(p99s):.2f}-{max(p99s):.2f} ms, median {median:.2f} ms "
                f"(limit: every minute <= {P99_STEADY_FACTOR:g}x the median)"))
    errors = sum(r["errors"] for r in rows)
    requests = sum(r["requests"] for r in rows)
    out.append((errors == 0, f"{errors} errors in {requests:,} requests"))
    achieved = statistics.mean(r["rps"] for r in rows)
    out.append((abs(achieved / result["target_rps"] - 1) <= 0.1,
                f"mean rate {achieved:,.0f} req/s vs target {result['target_rps']:,.0f} (within 10%)"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=int, default=10, help="measured minutes after the warm-up (default 10)")
    p.add_argument("--warmup", type=float, default=60, help="paced warm-up seconds before the RSS baseline (default 60)")
    p.add_argument("--rate-fraction", type=float, default=0.5, help="fraction of the measured maximum (default 0.5)")
    p.add_argument("--segment", type=float, default=60, help="seconds per measured segment (default 60: a "
                   "minute; shorter only to try the script)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) afterwards")
    args = p.parse_args(argv)
    bench.require_tools()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started in the background
    signal.signal(signal.SIGTERM, bench._terminate)  # tear the stack down on SIGTERM as on Ctrl-C
    tmp = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    try:
        started = datetime.now(timezone.utc)
        result = soak(tmp, args.minutes, args.warmup, args.rate_fraction, args.segment)
        checks = verdict(result)
        print()
        for ok, line in checks:
            print(f"{'PASS' if ok else 'MISS'}  {line}")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps({"started": started.isoformat(timespec="seconds"), "cores": os.cpu_count(),
                                       "source": bench.source_version(), **result,
                                       "checks": [{"passed": ok, "check": line} for ok, line in checks]},
                                      indent=2) + "\n")
        print(f"\nraw numbers: {RESULTS.relative_to(bench.ROOT)}")
        return 0 if all(ok for ok, _ in checks) else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep:
            print(f"soak: configs and logs kept in {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
