"""helm/gateway-extproc/README.md is generated from values.yaml (helm/chart_readme.py) and current:
every key the chart takes is listed with its default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "helm" / "gateway-extproc"


def generator():
    spec = importlib.util.spec_from_file_location("chart_readme", REPO / "helm" / "chart_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaves(values: dict, path: tuple[str, ...] = ()) -> list[str]:
    out = []
    for key, value in values.items():
        out += leaves(value, (*path, key)) if isinstance(value, dict) and value else [".".join((*path, key))]
    return out


def test_chart_readme_is_current() -> None:
    assert (CHART / "README.md").read_text() == generator().render(), "run `make chart-readme`"


def test_chart_readme_lists_every_value_with_its_comment() -> None:
    readme = (CHART / "README.md").read_text()
    for key in leaves(yaml.safe_load((CHART / "values.yaml").read_text())):
        assert f"| `{key}` |" in readme, key
    assert "| `deployment.extproc.image.tag` | `\"\"` | default: the chart's appVersion |" in readme
    assert "| `commonLabels` | `{}` | Labels added to every object" in readme
