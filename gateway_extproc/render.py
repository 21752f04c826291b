"""Render envoy.yaml and gateway.yaml from the Helm chart with the real Helm engine.

The chart is the single source of Envoy config: `make run`, the tests and users outside
Kubernetes all call this instead of keeping hand-written copies. helm-python-sdk is an
optional extra (`pip install gateway-extproc[render]`) so the runtime image need not carry it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "gateway-extproc"


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's rule for several values files: maps merge deeply, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def render_values(values: dict[str, Any], chart: Path = CHART) -> dict[str, str]:
    """Rendered file name -> content: envoy.yaml, gateway.yaml and, with TLS on, the SDS
    files Envoy reads certificate paths from."""
    from helm_python import Chart

    c = Chart.load(str(chart))
    try:
        manifests = c.render(values, name="gateway", namespace="default")
    finally:
        c.close()
    for path, text in manifests.items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt is the install message, not a manifest
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "ConfigMap" and "envoy.yaml" in doc.get("data", {}):
                return dict(doc["data"])
    raise RuntimeError(f"{chart}: no ConfigMap with envoy.yaml in the rendered chart")


def load_values(paths: list[Path]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in paths:
        values = merge(values, yaml.safe_load(p.read_text(encoding="utf-8")) or {})
    return values


def chart_values(paths: list[Path], chart: Path = CHART) -> dict[str, Any]:
    """The chart's defaults with these values files merged over them, as Helm would."""
    return merge(yaml.safe_load((chart / "values.yaml").read_text(encoding="utf-8")), load_values(paths))


def render(values_files: list[Path], out: Path, chart: Path = CHART) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_values(load_values(values_files), chart).items():
        path = out / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written
