"""Detection quality on the labelled corpus (tests/pii_corpus.py): recall per detector and per
evasion, false-positive rate per detector on benign text.

    .venv/bin/python bench/detection_quality.py [--misses]

Positives: every evasion of cards, SSNs, IBANs, e-mail addresses and phone numbers (separators,
format characters, Unicode digits and spaces, fullwidth forms, written-out `@`/`.`, base64 /
hex / URL encoding, values split over messages). A positive counts as found when the
detector fires on the strings of its request (scanned together, as the router does).
Benign: prose, source code, log lines, UUIDs, timestamps, order and tracking numbers; a line
is a false positive for a detector that fires on it. Targets: recall >= 99 %, FP <= 0.5 %.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway_extproc.policy import Scanner  # noqa: E402
from tests.pii_corpus import benign, positives  # noqa: E402

DETECTORS = ("credit_card", "us_ssn", "iban", "email", "phone")
RECALL_TARGET, FP_TARGET = 0.99, 0.005


def measure() -> tuple[dict[str, tuple[int, int]], dict[str, int], int, list[tuple[str, str]], dict[str, list[str]]]:
    scanner = Scanner.compile()
    found: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    misses: list[tuple[str, str]] = []
    for case in positives():
        hit = any(f.detector == case.detector for f in scanner.scan_strings(case.strings))
        found[case.detector][0] += hit
        found[case.detector][1] += 1
        if not hit:
            misses.append((case.detector, case.evasion))
    lines = benign()
    fps: Counter[str] = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        for d in {f.detector for f in scanner.scan(line)} & set(DETECTORS):
            fps[d] += 1
            examples[d].append(line)
    return {d: (h, n) for d, (h, n) in found.items()}, dict(fps), len(lines), misses, examples


def table(recall: dict[str, tuple[int, int]], fps: dict[str, int], n_benign: int) -> str:
    out = ["| detector | positives | found | recall | benign lines | false positives | FP rate | |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    total_h = total_n = 0
    for d in DETECTORS:
        h, n = recall.get(d, (0, 0))
        total_h, total_n = total_h + h, total_n + n
        fp = fps.get(d, 0)
        ok = n and h / n >= RECALL_TARGET and fp / n_benign <= FP_TARGET
        out.append(f"| {d} | {n} | {h} | {h / n:.1%} | {n_benign} | {fp} | {fp / n_benign:.2%} | "
                   f"{'PASS' if ok else 'MISS'} |")
    any_fp = sum(fps.values())
    out.append(f"| all | {total_n} | {total_h} | {total_h / total_n:.1%} | {n_benign} | {any_fp} | "
               f"{any_fp / n_benign:.2%} | |")
    return "\n".join(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--misses", action="store_true", help="list missed evasions and false-positive lines")
    args = p.parse_args()
    recall, fps, n_benign, misses, examples = measure()
    print(table(recall, fps, n_benign))
    if args.misses:
        for d, e in misses:
            print(f"missed {d}: {e}")
        for d, lines in examples.items():
            for line in lines:
                print(f"false positive {d}: {line}")
