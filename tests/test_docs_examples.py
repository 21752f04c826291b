"""The values snippets and `gateway-extproc` command lines in docs/*.md and envoy/README.md,
checked against the chart and the CLI as they are: a platform engineer pastes them literally.

Every ```yaml block whose top-level keys are chart values renders with the chart (over a
base that supplies what the snippet names but does not define: the providers, teams and
pricing it refers to), and every `gateway-extproc ...` line in a ```sh block (and in the
README's) parses with the CLI's own argument parser. Running them against a live gateway is
tests/integration/test_readme_walkthrough.py's job.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway_extproc.__main__ import build_parser
from gateway_extproc.render import _HelmLoader, chart_values, merge, render_values

REPO = Path(__file__).resolve().parents[1]
DOCS = [*sorted((REPO / "docs").glob("*.md")), REPO / "envoy" / "README.md"]
_YAML = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
_SH = re.compile(r"^```(?:sh|bash)\n(.*?)^```", re.S | re.M)
_HASH = "0" * 64

# What the snippets refer to without defining it (they show one part of a values file).
_PROVIDERS = {"openai": ("openai", "https://api.openai.com/v1"), "azure-eu": ("azure", "https://x.openai.azure.com"),
              "anthropic": ("anthropic", "https://api.anthropic.com/v1"), "groq": ("openai", "https://api.groq.com/v1"),
              "vllm-onprem": ("openai", "http://vllm.internal:8000/v1")}
BASE: dict[str, Any] = {
    "providers": [{"name": n, "kind": k, "baseURL": u, "credential": {"env": "KEY"},
                   **({"apiVersion": "2024-10-21"} if k == "azure" else {})} for n, (k, u) in _PROVIDERS.items()],
    "models": [{"name": "default-chat", "backends": [{"provider": "openai", "model": "gpt-4o-mini",
                                                       "pricing": {"input": 0.15, "output": 0.6}}]}],
    "teams": [{"name": t} for t in ("payments", "search", "general", "batch", "web", "demo")],
    "budgets": {"store": "redis", "redis": {"url": "redis://redis:6379/0"}},
}


def values_snippets() -> list[Any]:
    found = []
    chart_keys = set(chart_values([]))
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in _YAML.finditer(text):
            # A hash shown shortened (`sha256: 9b1f…`) stands for a whole one.
            text_ = re.sub(r"sha256: [0-9a-f]*…", f'sha256: "{_HASH}"', m.group(1))
            snippet = yaml.load(text_, Loader=_HelmLoader)  # noqa: S506 (a SafeLoader, as the CLI reads values)
            if isinstance(snippet, dict) and set(snippet) <= chart_keys:
                line = text.count("\n", 0, m.start()) + 1
                found.append(pytest.param(snippet, id=f"{doc.relative_to(REPO)}:{line}"))
    return found


def complete(snippet: dict[str, Any]) -> dict[str, Any]:
    """The snippet over BASE, each provider it lists given a kind and URL it leaves out."""
    snippet = dict(snippet)
    if "providers" in snippet:
        snippet["providers"] = [{**dict(zip(("kind", "baseURL"), _PROVIDERS.get(p["name"], ()), strict=False)), **p}
                                for p in snippet["providers"]]
    for key in snippet.get("keys") or []:  # (a shortened hash was replaced by a whole one)
        key.setdefault("sha256", _HASH)
        key.setdefault("team", "payments")
    return merge(BASE, snippet)


@pytest.mark.parametrize("snippet", values_snippets())
def test_docs_values_snippet_renders_with_the_chart(snippet: dict[str, Any]) -> None:
    rendered = render_values(merge(chart_values([]), complete(snippet)))
    assert {"envoy.yaml", "gateway.yaml"} <= set(rendered)


_SUBST = re.compile(r"\$\(([^()]*)\)")  # `$(...)`: a command of its own
_CALL = re.compile(r"(?:^|[\s/])gateway-extproc\s+([^|;&]*?)\s*(?:\s#\s.*)?$")


def cli_lines() -> list[Any]:
    """Every `gateway-extproc ...` invocation in a shell example, `$(...)` ones included."""
    found = []
    for doc in [*DOCS, REPO / "README.md"]:
        text = doc.read_text(encoding="utf-8")
        for m in _SH.finditer(text):
            start = text.count("\n", 0, m.start()) + 2
            for i, line in enumerate(m.group(1).replace("\\\n", " ").splitlines()):
                if line.startswith(("#", "helm ")):
                    continue  # output shown, or a chart *named* gateway-extproc
                for command in [*_SUBST.findall(line), _SUBST.sub("X", line)]:
                    if call := _CALL.search(command):
                        found.append(pytest.param(call.group(1), id=f"{doc.relative_to(REPO)}:{start + i}"))
    return found


@pytest.mark.parametrize("args", cli_lines())
def test_docs_command_line_parses(args: str) -> None:
    argv = shlex.split(args)
    parser = build_parser()
    try:
        parser.parse_args(argv)
    except SystemExit as exit_:
        pytest.fail(f"gateway-extproc {args}: the CLI refuses it (exit {exit_.code})")


def test_budgets_md_shows_the_end_of_a_cut_stream_as_the_gateway_writes_it() -> None:
    """docs/budgets.md's example of a stream cut at its reservation, with P, R and N filled in,
    is byte for byte what the gateway sends (it once quoted a message no code wrote)."""
    from gateway_extproc.processors.router import _cut_events

    text = (REPO / "docs" / "budgets.md").read_text(encoding="utf-8")
    shown = next(b for lang, b in re.findall(r"^```([a-z]*)\n(.*?)^```$", text, re.S | re.M)
                 if not lang and '"budget_exceeded"' in b)
    filled = shown.replace("P+R", "18").replace(":P,", ":8,").replace(":R,", ":10,").replace("the N output", "the 10 output")
    usage = {"prompt_tokens": 8, "completion_tokens": 10, "total_tokens": 18}
    assert _cut_events(10, usage).decode() == filled + "\n"  # (an SSE event ends with a blank line)
