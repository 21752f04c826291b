"""Every error code a client can see is explained in docs/runbooks.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from gateway_extproc.errors import _TYPE_BY_STATUS, CODES
from gateway_extproc.render import chart_values, render_values

REPO = Path(__file__).resolve().parents[1]
RUNBOOKS = REPO / "docs" / "runbooks.md"
# Every values file the docs tell a user to render: each may switch on listeners and filters
# (mTLS, OIDC, the admin API) whose error replies the chart defaults never render.
DOCUMENTED_VALUES = [[REPO / "helm" / "values-local.yaml", REPO / "helm" / "values-local-identity.yaml"],
                     *([p] for p in sorted((REPO / "helm" / "examples").glob("*.yaml")))]


def envoy_codes() -> set[str]:
    envoy = yaml.safe_load(render_values(chart_values([]))["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    # (the refusal routes' mapper passes the ext_proc's own error on: no code of Envoy's)
    return {m["body_format_override"]["json_format"]["error"]["code"] for m in hcm["local_reply_config"]["mappers"]
            if "json_format" in m["body_format_override"]}


def rendered_codes(node: Any) -> set[str]:
    """Every `code` in a rendered config: a reply mapper's JSON, a direct response's body."""
    if isinstance(node, dict):
        own = {v for k, v in node.items() if k == "code" and isinstance(v, str) and not v.startswith("%")}
        return own.union(*(rendered_codes(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(rendered_codes(v) for v in node))
    if isinstance(node, str):
        return set(re.findall(r'"code"\s*:\s*"([a-z_]+)"', node))
    return set()


def source_codes() -> set[str]:
    """Codes the ext_proc writes without GatewayError (a stream's last event, the admin API's
    catch-all): a literal passed to error_body/error_object or set as a `"code"`."""
    found: set[str] = set()
    for path in (REPO / "gateway_extproc").rglob("*.py"):
        if path.name == "mock_provider.py" or "_proto" in path.parts:
            continue  # the mock plays providers, whose codes are theirs
        text = path.read_text(encoding="utf-8")
        for call in re.finditer(r"\berror_(?:body|object)\(((?:[^()]|\([^()]*\))*)\)", text):
            found |= set(re.findall(r'"([a-z_]+)"', call.group(1)))  # (a message has spaces)
        found |= set(re.findall(r'"code":\s*"([a-z_]+)"', text))
    return found - {*_TYPE_BY_STATUS.values(), "server_error"} - {"message", "type", "code", "param"}


def test_codes_in_every_documented_render_and_in_the_source_have_runbook_entries() -> None:
    documented = set(re.findall(r"^### `([a-z_]+)`$", RUNBOOKS.read_text(), re.M))
    for values in DOCUMENTED_VALUES:
        for name, text in render_values(chart_values(values)).items():
            codes = set().union(*(rendered_codes(doc) for doc in yaml.safe_load_all(text)))
            assert codes - documented == set(), f"{name} of {[v.name for v in values]}: add to docs/runbooks.md"
    in_source = source_codes()
    assert {"upstream_stream_interrupted", "key_store_unavailable", "budget_exceeded", "provider_error"} <= in_source
    assert in_source - documented == set(), "add these to docs/runbooks.md"


def test_every_code_has_a_runbook_entry() -> None:
    documented = set(re.findall(r"^### `([a-z_]+)`$", RUNBOOKS.read_text(), re.M))
    expected = set(CODES) | envoy_codes()
    assert expected - documented == set(), "add these to docs/runbooks.md"
    assert documented - expected == set(), "docs/runbooks.md documents codes nothing returns"
