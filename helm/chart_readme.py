"""Write helm/gateway-extproc/README.md from values.yaml: every key with its default and the
comment above it, so the chart's reference cannot drift from its values (`make chart-readme`;
tests/test_chart_readme.py fails when the file is stale).

The comment of a key is the block of `#` lines directly above it (a blank line ends a block);
a commented mapping gets a row above its keys. Lists and empty mappings are one row each.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "gateway-extproc"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")
HEAD = """# gateway-extproc Helm chart

<!-- Generated from values.yaml by helm/chart_readme.py (`make chart-readme`); do not edit. -->

An AI gateway: Envoy and the gateway-extproc ext_proc in one pod, configured from these values
(the same templates render `envoy.yaml` and `gateway.yaml` for `gateway-extproc render` and the
tests). Build the ext_proc image, create the provider Secrets, install:

```sh
make image IMAGE=registry.example.com/ai/gateway-extproc:0.1.0 && docker push registry.example.com/ai/gateway-extproc:0.1.0
helm install gateway-extproc helm/gateway-extproc -n ai-platform -f my-values.yaml \\
  --set deployment.extproc.image.repository=registry.example.com/ai/gateway-extproc
helm test gateway-extproc -n ai-platform
```

Guides: [deploying on Kubernetes](../../docs/deploy-kubernetes.md),
[configuration](../../docs/configuration.md), [budgets](../../docs/budgets.md),
[observability and alerts](../../docs/observability.md), [runbooks](../../docs/runbooks.md).
`values.schema.json` rejects unknown keys, so a typo fails the install.

## Values

| Key | Default | Description |
|---|---|---|
"""


def comments(text: str) -> dict[tuple[str, ...], str]:
    """{key path: the comment block above it}."""
    found: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            body = stripped.lstrip("#").strip()
            if not set(body) <= {"-"}:  # separator rules are not prose
                block.append(body)
            continue
        match = KEY.match(line)
        if not stripped or not match:
            block = [] if not stripped else block
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        trailing = re.search(r"\s#\s+(.*)$", match["rest"])  # `tag: ""  # default: ...`
        found[tuple(key for _, key in stack)] = " ".join([*block, *([trailing[1]] if trailing else [])])
        block = []
    return found


def rows(values: dict[str, Any], notes: dict[tuple[str, ...], str],
         path: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    out = []
    for key, value in values.items():
        here = (*path, key)
        note = notes.get(here, "")
        if isinstance(value, dict) and value:
            if note:  # a section's comment gets a row of its own, above its keys
                out.append((".".join(here), "", note))
            out += rows(value, notes, here)
            continue
        default = json.dumps(value, ensure_ascii=False)
        out.append((".".join(here), default if len(default) <= 60 else "see values.yaml", note))
    return out


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def render(chart: Path = CHART) -> str:
    text = (chart / "values.yaml").read_text(encoding="utf-8")
    table = "".join(f"| `{key}` | {f'`{default}`' if default else ''} | {cell(note)} |\n"
                    for key, default, note in rows(yaml.safe_load(text), comments(text)))
    return HEAD + table


def main() -> int:
    out = CHART / "README.md"
    out.write_text(render(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
