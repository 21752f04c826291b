"""Every error code a client can see is explained in docs/runbooks.md."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from gateway_extproc.errors import CODES
from gateway_extproc.render import chart_values, render_values

RUNBOOKS = Path(__file__).resolve().parents[1] / "docs" / "runbooks.md"


def envoy_codes() -> set[str]:
    envoy = yaml.safe_load(render_values(chart_values([]))["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    return {m["body_format_override"]["json_format"]["error"]["code"] for m in hcm["local_reply_config"]["mappers"]}


def test_every_code_has_a_runbook_entry() -> None:
    documented = set(re.findall(r"^### `([a-z_]+)`$", RUNBOOKS.read_text(), re.M))
    expected = set(CODES) | envoy_codes()
    assert expected - documented == set(), "add these to docs/runbooks.md"
    assert documented - expected == set(), "docs/runbooks.md documents codes nothing returns"
