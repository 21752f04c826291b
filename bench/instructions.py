"""Instructions per request of the gateway's own logic (`bench/hot_path.py`), counted by
valgrind, for each source tree given: a figure the machine's load moves less than time.

    .venv/bin/python bench/instructions.py [TREE ...]     (default: this checkout)

Timed figures on a shared machine drift by ±30 % between runs (bench/README.md), so a
change of a few percent in the router's logic is only seen in alternated runs, if at all.
Valgrind's cachegrind counts the instructions the process executes instead: the same code
counted the same within ~0.5 % in one quiet run, but 11 % more on a quiet machine than while
tests ran beside it (bench/README.md, 2026-12-06 evening): compare trees in one run, on a
quiet machine. Each tree (this checkout, or a
`git archive` export of another commit) runs hot_path.py twice under cachegrind, 200 and 1,200
requests after the same warm-up; the difference over 1,000 is the figure, start-up excluded.
Needs valgrind (`apt-get install -y valgrind`); about five minutes per tree.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTS = (200, 1200)


def instructions(tree: Path, requests: int) -> int:
    """The instructions cachegrind counted for one hot_path.py run in `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0"}
    out = subprocess.run(["valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                          sys.executable, "bench/hot_path.py", "--requests", str(requests), "--rounds", "1"],
                         cwd=tree, env=env, capture_output=True, text=True)
    m = re.search(r"I\s+refs:\s+([\d,]+)", out.stderr)
    if out.returncode != 0 or m is None:
        raise RuntimeError(f"{tree}: hot_path.py under valgrind failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return int(m.group(1).replace(",", ""))


def main(argv: list[str]) -> int:
    if shutil.which("valgrind") is None:
        print("needs valgrind: apt-get install -y valgrind", file=sys.stderr)
        return 2
    for tree in [Path(t).resolve() for t in argv] or [ROOT]:
        # Each count twice, the lower kept: one start-up in a few ran ~5 G instructions longer
        # (not found which part), which would swamp the difference.
        low, high = (min(instructions(tree, n), instructions(tree, n)) for n in COUNTS)
        print(f"{tree}: {(high - low) / (COUNTS[1] - COUNTS[0]):,.0f} instructions per request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
