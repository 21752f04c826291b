"""In-process cost of the request classification scan, on prompts of 4 KB and 1 MB.

    .venv/bin/python bench/scan_cost.py [--quick]

`bench/run.py` calls `measure()` before it starts any server; this file also runs alone.
The policy is the one the gateway builds: helm/values-local.yaml rendered by the chart,
parsed by `config.parse`, compiled by `Policy` (the default rules with values-local's
overrides). Each case is timed with `time.perf_counter` many times and the median is
reported, for two calls:

- `check_request`: what the router runs on a parsed chat body: walk every string, one
  scan pass, decide, redact (when something matched) and pick the eligible backends;
- `scan_strings`: the scanner alone on the message strings.

Prompts (the user message; the bench's system message comes on top):

- prose: English help-desk text, a few digits;
- mixed: engineering text with log lines, timestamps, metrics, code and ticket numbers
  (many digits, which is where the card, SSN, phone and IP detectors look closer);
- mixed + PII: the mixed text with two e-mail addresses and two phone numbers (redacted).

Logging is configured as in the gateway (JSON lines) but written to /dev/null, so a finding
costs its log events without flooding the terminal.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway_extproc import config  # noqa: E402
from gateway_extproc.policy.classification import Policy  # noqa: E402
from gateway_extproc.render import chart_values, render_values  # noqa: E402

VALUES_LOCAL = ROOT / "helm" / "values-local.yaml"
SIZES = {"4 KB": 4096, "1 MB": 1 << 20}
TARGET_MS = {"4 KB": 0.1, "1 MB": 10.0}  # median check_request per prompt (issue 14)
RUNS = {"4 KB": (100, 2000), "1 MB": (3, 40)}  # (warm-up, timed) runs per call
QUICK_RUNS = {"4 KB": (20, 300), "1 MB": (1, 8)}

SYSTEM = ("You are a concise assistant for an internal engineering help desk. Answer in plain English, cite the "
          "relevant runbook section when you know it, and say so when you do not know. Never include credentials, "
          "customer data or internal hostnames in an answer.")

PROSE = [
    "Our nightly batch job that exports invoices to the data warehouse started failing after last week's deploy. "
    "The logs show 'connection reset by peer' roughly forty minutes into the run, always while writing the largest "
    "partition. Retries succeed about half of the time.",
    "What are the three most likely causes, and what should I check first for each? Please keep the answer short, "
    "list the checks in order, and tell me which metrics or log lines would confirm each cause before I change "
    "anything in production.",
    "The job runs in the shared cluster next to the reporting services. Nobody changed the network policies, as far "
    "as I know, but the platform team did rotate the load balancers during the maintenance window on Tuesday night.",
    "When the job fails it leaves a partial partition behind, and the next run has to clean it up first, which makes "
    "the whole pipeline late for the finance team. They asked whether we can make the export resumable instead.",
    "I would also like to understand why the smaller partitions never fail. Is it only the time they take, or could "
    "the size of a single write matter as well? The largest partition is several times bigger than the others.",
]

MIXED = [
    "The export job reads invoices from the billing database in batches of 5000 rows, converts them to Parquet and "
    "uploads each partition to the warehouse bucket. Since the deploy on Tuesday the job fails after roughly forty "
    "minutes with 'connection reset by peer'.",
    "2026-11-20T03:14:07Z INFO exporter partition=2026-11 rows=184223 bytes=73400320 elapsed_ms=2412003 attempt=2 "
    "status=retrying",
    "We run version 4.12.3 of the exporter on Kubernetes 1.29 with three replicas; each pod has 2 CPU and 4 GiB of "
    "memory, and the load balancer idle timeout is set to 3600 seconds according to the Terraform module.",
    "def flush(batch):\n    for chunk in split(batch, size=1000):\n        writer.write(chunk)\n    writer.close()  "
    "# raises ConnectionResetError after ~40 min\n",
    "Error rates by hour: 00:00 0.2%, 01:00 0.1%, 02:00 3.4%, 03:00 12.8%, 04:00 0.3%. The p99 write latency rose "
    "from 180 ms to 2.4 s on the largest partition.",
    "Please review the retry policy: max_attempts=5, backoff base 250 ms, multiplier 2.0, jitter 0.1, and tell me "
    "whether the warehouse client honours the server's keep-alive of 75 s or reuses stale connections from its pool.",
    "Ticket INC-48213 was opened at 03:20 by the on-call engineer; the runbook section 7.3 says to check the NAT "
    "gateway's connection tracking table, which holds at most 55000 entries per availability zone.",
    "Summary of the last five runs: run 1 failed at 41 min, run 2 succeeded in 52 min, run 3 failed at 39 min, run 4 "
    "failed at 44 min, run 5 succeeded in 57 min. The dataset grew by 8 percent week over week.",
]

PII = ["Reply to jane.doe@example.com with the result.", "Call the on-call phone +1 415 555 0134 if it fails again.",
       "Copy finance-ops@example.org on the answer.", "The vendor's support line is +44 20 7946 0958."]
KINDS = ("prose", "mixed", "mixed + PII")


def prompt(kind: str, size: int) -> str:
    """`size` characters (ASCII, so bytes) of paragraphs, numbered so no two repeat exactly."""
    paras = PROSE if kind == "prose" else MIXED
    parts, total, i = [], 0, 0
    while total < size:
        para = f"{paras[i % len(paras)]} (note {i})\n\n"
        parts.append(para)
        total += len(para)
        i += 1
    text = "".join(parts)[:size]
    if kind.endswith("PII"):  # four values spread over the prompt, on paragraph boundaries
        for n, value in reversed(list(enumerate(PII, 1))):
            at = text.rfind("\n\n", 0, size * n // (len(PII) + 1)) + 2
            text = text[:at] + value + " " + text[at:]
        text = text[:size]
    assert len(text) == size
    return text


@dataclass
class ScanCost:
    kind: str
    size: str
    prompt_bytes: int
    findings: int
    redacted: bool
    check_request_ms: float  # median
    check_request_min_ms: float
    scan_strings_ms: float  # median
    runs: int
    target_ms: float

    @property
    def passed(self) -> bool:
        return self.check_request_ms <= self.target_ms


def _policy() -> tuple[Policy, config.GatewayConfig]:
    values = chart_values([VALUES_LOCAL])
    cfg = config.parse(yaml.safe_load(render_values(values)["gateway.yaml"]), "helm/values-local.yaml (rendered)")
    assert cfg.classification is not None, "values-local has no classification section"
    return Policy(cfg.classification), cfg


def _quiet_logs() -> None:
    """The gateway's structlog set-up, writing to /dev/null."""
    from gateway_extproc import logs

    sink = open(os.devnull, "w")  # noqa: SIM115 - kept open for the process's lifetime
    stdout, sys.stdout = sys.stdout, sink
    try:
        logs.configure()
    finally:
        sys.stdout = stdout


def _times(fn: Any, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(quick: bool = False) -> list[ScanCost]:
    _quiet_logs()
    policy, cfg = _policy()
    key = cfg.keys["demo"]
    team, model = cfg.teams.get(key.team), cfg.models["default-chat"]
    results = []
    for size_name, size in SIZES.items():
        warmup, runs = (QUICK_RUNS if quick else RUNS)[size_name]
        for kind in KINDS:
            text = prompt(kind, size)
            body = {"model": "default-chat", "messages": [{"role": "system", "content": SYSTEM},
                                                          {"role": "user", "content": text}],
                    "temperature": 0.2, "max_tokens": 300, "user": "helpdesk-bench-user-0001"}
            messages = [m["content"] for m in body["messages"]]
            findings = policy.scanner.scan_strings(messages)
            verdict = policy.check_request(body, key, team, None, model, key.team)
            assert verdict.body is not None or not any(f.rule in ("email", "phone") for f in findings)
            gc.collect()
            check = _times(lambda: policy.check_request(body, key, team, None, model, key.team), warmup, runs)
            scan = _times(lambda: policy.scanner.scan_strings(messages), warmup, runs)
            results.append(ScanCost(kind, size_name, len(text), len(findings), verdict.body is not None,
                                    statistics.median(check) * 1000, min(check) * 1000,
                                    statistics.median(scan) * 1000, runs, TARGET_MS[size_name]))
    return results


def table(results: list[ScanCost]) -> str:
    lines = ["| prompt (user message) | size | findings | check_request median (ms) | min (ms) "
             "| scan_strings median (ms) | runs | target (ms) | |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        found = f"{r.findings}{' (redacted)' if r.redacted else ''}"
        lines.append(f"| {r.kind} | {r.size} | {found} | {r.check_request_ms:.3f} | {r.check_request_min_ms:.3f} "
                     f"| {r.scan_strings_ms:.3f} | {r.runs} | {r.target_ms:g} | {'PASS' if r.passed else 'MISS'} |")
    return "\n".join(lines)


def as_json(results: list[ScanCost]) -> list[dict[str, Any]]:
    return [{**asdict(r), "passed": r.passed} for r in results]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer runs")
    print(table(measure(p.parse_args().quick)))
