"""Run the README's Python examples as written, against a running gateway.

Used by `.ci/run` (after `make run`, with only what `make run` installed) and by
tests/integration/test_newcomer.py (a fresh venv, a gateway on free ports). Standard
library only: it must run in that venv before the test extra exists.

    python tests/readme_snippets.py [README.md] [--base http://127.0.0.1:PORT]

Exits non-zero on the first example that fails, naming it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

_DEFAULT_BASE = "http://localhost:8080"
_ANY_BLOCK = re.compile(r"^```(python|sh|bash)\n(.*?)^```", re.S | re.M)
# A whole-line comment that shows what a shell example prints (the rest are prose).
_OUTPUT = re.compile(r"^# ((?:\{|x-|OK |OPEN |BAD |public key |scope,| {2,}record ).*)$", re.M)
# `command   # "team":"demo"`: a part of what that command prints.
_INLINE = re.compile(r"\S\s+# (\"[^#\n]*)$", re.M)


def blocks(readme: str) -> list[tuple[int, str, str]]:
    """(line number, "python" or "sh", code) of every example, in reading order."""
    return [(readme.count("\n", 0, m.start()) + 1, "python" if m.group(1) == "python" else "sh", m.group(2))
            for m in _ANY_BLOCK.finditer(readme)]


def snippets(readme: str) -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    return [(line, code) for line, kind, code in blocks(readme) if kind == "python"]


def printed(block: str) -> list[re.Pattern[str]]:
    """What a shell example says it prints, one pattern per output line: `...` or `…` stands
    for anything, `myhost` for the host name, and in a `public key`, `OK` or `OPEN` line of
    `audit verify` the key's id and the counts vary with the calls made before it."""
    out = []
    for line in _OUTPUT.findall(block):
        varies = line.startswith(("OK ", "OPEN ", "public key "))
        token = r"\.\.\.|…|\s+|myhost" + (r"|[0-9a-f]{16}\b|\d+" if varies else "")
        pattern = "".join(
            ".*" if part in ("...", "…") else r"\s+" if part.isspace() else r"\S+" if part == "myhost"
            else r"\w+" if varies and re.fullmatch(r"[0-9a-f]{16}|\d+", part) else re.escape(part)
            for part in re.split(f"({token})", line) if part)
        out.append(re.compile(pattern))
    return out + [re.compile(".*" + re.escape(fragment.strip()) + ".*") for fragment in _INLINE.findall(block)]


def run(readme_path: Path, base: str = _DEFAULT_BASE, python: str = sys.executable) -> int:
    text = readme_path.read_text(encoding="utf-8")
    found = snippets(text)
    if not found:
        print(f"error: {readme_path}: no ```python examples found", file=sys.stderr)
        return 1
    for line, code in found:
        code = code.replace(_DEFAULT_BASE, base)
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            print(f"error: {readme_path}:{line}: example failed (exit {done.returncode}):\n{done.stderr[-3000:]}",
                  file=sys.stderr)
            return 1
        print(f"ok {readme_path}:{line}: {done.stdout.strip()[:120]!r}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("readme", nargs="?", type=Path, default=Path(__file__).resolve().parents[1] / "README.md",
                   help="markdown file whose ```python blocks to run (default: the repository README)")
    p.add_argument("--base", default=_DEFAULT_BASE, help=f"gateway URL replacing {_DEFAULT_BASE} in the examples")
    args = p.parse_args()
    return run(args.readme, args.base)


if __name__ == "__main__":
    sys.exit(main())
