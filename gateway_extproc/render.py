"""Render envoy.yaml and gateway.yaml from the Helm chart with the real Helm engine.

The chart is the single source of Envoy config: `make run`, the tests and users outside
Kubernetes all call this instead of keeping hand-written copies. helm-python-sdk is an
optional extra (`pip install gateway-extproc[render]`) so the runtime image need not carry it.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "gateway-extproc"


class RenderError(ValueError):
    """A values problem: names the values files, the key path (with list indexes) and the fix."""


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's rule for several values files: maps merge deeply, anything else replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def render_values(values: dict[str, Any], chart: Path = CHART, source: str = "values") -> dict[str, str]:
    """Rendered file name -> content: envoy.yaml, gateway.yaml and, with TLS on, the SDS
    files Envoy reads certificate paths from. `source` names the values files in errors."""
    try:
        from helm_python import Chart
        from helm_python.errors import HelmError
    except ImportError:
        raise RenderError("rendering needs the Helm engine: pip install 'gateway-extproc[render]' "
                          "(make run installs it)") from None
    _check_references(values, source)
    c = Chart.load(str(chart))
    try:
        manifests = c.render(values, name="gateway", namespace="default")
    except HelmError as exc:
        raise RenderError(_helm_message(str(exc), source, chart)) from None
    finally:
        c.close()
    for path, text in manifests.items():
        if not path.endswith((".yaml", ".yml")):
            continue  # NOTES.txt is the install message, not a manifest
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "ConfigMap" and "envoy.yaml" in doc.get("data", {}):
                return dict(doc["data"])
    raise RuntimeError(f"{chart}: no ConfigMap with envoy.yaml in the rendered chart")


def _check_references(values: dict[str, Any], source: str) -> None:
    """Name checks the chart's templates can only report without list indexes."""
    def items(value: Any) -> list[Any]:  # (wrong types are the schema's to report, after this)
        return value if isinstance(value, list) else []

    names = [p.get("name") if isinstance(p, dict) else None for p in items(values.get("providers"))]
    if not all(isinstance(n, str) for n in names):
        return
    providers = set(names)
    for i, model in enumerate(items(values.get("models"))):
        for j, backend in enumerate(items(model.get("backends")) if isinstance(model, dict) else []):
            name = backend.get("provider") if isinstance(backend, dict) else None
            if isinstance(name, str) and name not in providers:
                near = difflib.get_close_matches(name, list(providers), 1)
                hint = f"did you mean {near[0]!r}? " if near else ""
                raise RenderError(f"{source}: models[{i}].backends[{j}].provider is {name!r}, not in providers; "
                                  f"{hint}add it to providers or fix the name")


_SCHEMA_LINE = re.compile(r"^- at '([^']*)': (.*)$")
# Helm writes numbers in a schema message for reading aloud: 4.294967296×10⁰⁹, 100,000.
_SCIENTIFIC = re.compile(r"(\d+(?:\.\d+)?)×10([⁰¹²³⁴⁵⁶⁷⁸⁹]+)")
_GROUPED = re.compile(r"(?<=got |ant )\d{1,3}(?:,\d{3})+\b")  # after "got " / "want " only


def _plain_numbers(text: str) -> str:
    """4.294967296×10⁰⁹ -> 4294967296 and 100,000 -> 100000: the numbers as values files write them."""
    def scientific(m: re.Match[str]) -> str:
        from decimal import Decimal

        exp = int(m.group(2).translate(str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")))
        return format(Decimal(m.group(1)).scaleb(exp).normalize(), "f")
    return _GROUPED.sub(lambda m: m.group(0).replace(",", ""), _SCIENTIFIC.sub(scientific, text))
_QUOTED_VALUE = re.compile(r"^'.*' (?=does not match pattern )", re.S)
_UNKNOWN_KEY = re.compile(r"additional properties? ((?:'[^']+'(?:, )?)+) not allowed")


def _helm_message(message: str, source: str, chart: Path) -> str:
    """One line from Helm's error: schema violations as key paths with list indexes (and a
    suggestion for a misspelt key), template `fail`s without Helm's location prefix."""
    problems = []
    for line in message.splitlines():
        if m := _SCHEMA_LINE.match(line.strip()):
            path = _key_path(m.group(1))
            problem = m.group(2)
            if u := _UNKNOWN_KEY.search(problem):
                for key in re.findall(r"'([^']+)'", u.group(1)):
                    problems.append(_unknown_key(path, key, chart))
            elif problem != "'allOf' failed":  # (the failing branch follows on its own line)
                # A pattern says little to a reader: the key's description says what it takes.
                hint = _schema_at(path, chart).get("description") if "does not match pattern" in problem else None
                if missing := _MISSING.match(problem):
                    hint = _missing_hint(path, missing.group(1), chart)
                # Helm quotes the refused value; a secret pasted into the wrong field (a caller key
                # as keys[].sha256, a provider key as credential.env) would be printed with it.
                problem = _plain_numbers(_QUOTED_VALUE.sub("", problem))
                problems.append(f"{path or '<top level>'}: {problem}" + (f" ({hint})" if hint else ""))
    if problems:
        return f"{source}: " + "; ".join(problems)
    text = re.sub(r"^execution error at \([^)]*\): ", "", message.strip().splitlines()[0])
    return f"{source}: {text.removeprefix('values: ')}"


_MISSING = re.compile(r"^missing property '([^']+)'$")


def _missing_hint(path: str, key: str, chart: Path) -> str | None:
    """Why a required key is missing: the chart has a default for it (a null in a values file
    removed it, Helm's rule), or what the key is (its schema description)."""
    node: Any = yaml.safe_load((chart / "values.yaml").read_text(encoding="utf-8"))
    for part in re.findall(r"[^.\[\]]+", path):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and key in node:
        return "a null in a values file removes the chart's default; give a value or leave the key out"
    return _schema_at(f"{path}.{key}" if path else key, chart).get("description")


def _key_path(pointer: str) -> str:
    """JSON pointer /models/0/backends/1/provider -> models[0].backends[1].provider."""
    out = ""
    for part in pointer.strip("/").split("/"):
        if not part:
            continue
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out


def _unknown_key(path: str, key: str, chart: Path) -> str:
    """'envoy.listner is not a key the chart knows (a typo?); did you mean 'listener'?'"""
    where = f"{path}.{key}" if path else key
    near = difflib.get_close_matches(key, _schema_keys(path, chart), 1)
    fix = f"did you mean {near[0]!r}?" if near else f"see {chart.name}/values.schema.json for the keys it takes"
    return f"{where} is not a key the chart knows (a typo?); {fix}"


def _schema_keys(path: str, chart: Path) -> list[str]:
    """The keys values.schema.json allows at this key path."""
    return list(_schema_at(path, chart).get("properties", {}))


def _schema_at(path: str, chart: Path) -> dict[str, Any]:
    """values.schema.json's node for this key path ({} where it has none)."""
    import json

    schema = json.loads((chart / "values.schema.json").read_text(encoding="utf-8"))

    def resolve(node: dict[str, Any]) -> dict[str, Any]:
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].rsplit("/", 1)[1]]
        return node

    node = resolve(schema)
    for part in re.findall(r"[^.\[\]]+", path):
        node = resolve(node.get("items", {}) if part.isdigit() else node.get("properties", {}).get(part, {}))
    return node


class _HelmLoader(yaml.SafeLoader):
    """YAML as Helm reads a values file: a timestamp (`expiresAt: 2027-06-30T00:00:00Z`, a bare
    date) stays the string written, as Helm passes it on; a datetime stopped the Helm engine's
    JSON encoding with a traceback."""


_HelmLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_scalar)


def load_values(paths: list[Path]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for p in paths:
        try:
            doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_HelmLoader)  # noqa: S506 (a SafeLoader)
        except FileNotFoundError:
            raise RenderError(f"{p}: values file not found; check the path") from None
        except IsADirectoryError:
            raise RenderError(f"{p}: is a directory; give a values file") from None
        except UnicodeDecodeError as exc:
            from .config import not_utf8

            raise RenderError(f"{p}: {not_utf8(exc)}") from None
        except yaml.YAMLError as exc:
            from .config import yaml_problem

            raise RenderError(f"{p}: not valid YAML ({yaml_problem(exc)}); fix the syntax") from None
        if doc is not None and not isinstance(doc, dict):
            raise RenderError(f"{p}: must be a mapping of values (like helm/values-local.yaml)")
        values = merge(values, doc or {})
    return values


def describe(paths: list[Path]) -> str:
    """How errors name the values: the files given, or the chart's defaults."""
    return " + ".join(str(p) for p in paths) if paths else f"{CHART.name}/values.yaml"


def chart_values(paths: list[Path], chart: Path = CHART) -> dict[str, Any]:
    """The chart's defaults with these values files merged over them, as Helm would."""
    return merge(yaml.safe_load((chart / "values.yaml").read_text(encoding="utf-8")), load_values(paths))


def render(values_files: list[Path], out: Path, chart: Path = CHART) -> list[Path]:
    """Render into `out`, after checking the gateway.yaml it produces as `serve` will (so a
    key naming a missing team fails here, not at start-up)."""
    from . import config

    source = describe(values_files)
    files = render_values(load_values(values_files), chart, source)
    try:
        config.parse(config.load_yaml(files["gateway.yaml"]), source, local_files=False)
    except config.ConfigError as exc:
        raise RenderError(str(exc)) from None
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        # Written beside and renamed over: a worker reloading gateway.yaml (reload.py) sees
        # the old file or the new one, never a prefix of the new one that happens to load.
        part = path.with_name(f".{name}.part")
        part.write_text(text, encoding="utf-8")
        part.replace(path)
        written.append(path)
    return written
