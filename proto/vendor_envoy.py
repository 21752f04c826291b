"""Copy the generated Python code of Envoy's ext_proc API (and only what it imports) from the
`xds-protos` wheel into gateway_extproc/_proto/, with imports rewritten under that package.

Why not depend on `xds-protos`: its wheel also ships an old `opentelemetry/proto` tree and a
`google/api`, `google/rpc` tree. Whichever wheel the installer unpacks last wins, so a plain
`pip install .` could leave opentelemetry-proto's files replaced by copies without
`InstrumentationScope`, and the OTLP exporter failed to import. Vendoring the ~20 modules the
gateway needs, under our own package name, removes the clash for every installer.

Run `make envoy-protos` to refresh (downloads the pinned wheel; nothing is installed). The
descriptors keep Envoy's proto file names, so the wire format is Envoy's exactly.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

XDS_PROTOS = "xds-protos==1.85.0"
ROOTS = (
    "envoy/service/ext_proc/v3/external_processor_pb2.py",
    "envoy/service/ext_proc/v3/external_processor_pb2_grpc.py",
    "envoy/type/v3/http_status_pb2.py",
    "envoy/extensions/filters/http/ext_proc/v3/processing_mode_pb2.py",
)
TOP = ("envoy", "udpa", "validate", "xds")
PACKAGE = "gateway_extproc._proto"
IMPORT = re.compile(rf"^from ((?:{'|'.join(TOP)})(?:\.\w+)*) import (\w+)", re.M)
DEST = Path(__file__).resolve().parent.parent / "gateway_extproc" / "_proto"


def closure(wheel: zipfile.ZipFile) -> dict[str, str]:
    sources: dict[str, str] = {}
    todo = list(ROOTS)
    while todo:
        path = todo.pop()
        if path in sources:
            continue
        sources[path] = wheel.read(path).decode()
        todo += [f"{pkg.replace('.', '/')}/{mod}.py" for pkg, mod in IMPORT.findall(sources[path])]
    return sources


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, XDS_PROTOS], check=True)
        (wheel_path,) = Path(tmp).glob("xds_protos-*.whl")
        with zipfile.ZipFile(wheel_path) as wheel:
            sources = closure(wheel)
    if DEST.exists():
        for old in sorted(DEST.rglob("*"), reverse=True):
            old.unlink() if old.is_file() else old.rmdir()
    for path, text in sorted(sources.items()):
        text = IMPORT.sub(lambda m: f"from {PACKAGE}.{m.group(1)} import {m.group(2)}", text)
        target = DEST / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for folder in [DEST, *(p for p in DEST.rglob("*") if p.is_dir())]:
        (folder / "__init__.py").touch()
    (DEST / "__init__.py").write_text(f'"""Envoy ext_proc API, generated code copied from {XDS_PROTOS} by '
                                      'proto/vendor_envoy.py (do not edit)."""\n')
    print(f"{len(sources)} modules from {XDS_PROTOS} -> {DEST}")


if __name__ == "__main__":
    main()
