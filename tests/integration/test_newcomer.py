"""A newcomer's path, with nothing but what `make run` installs.

A fresh venv made by the Makefile's own `make run` install step (not the test extra),
`gateway-extproc local` from it, then every README example as written, run by that venv's
Python. A runtime or demo dependency missing from pyproject.toml fails here. Slow (it
installs a venv from the package index); .ci/run does the same with `make run` itself.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from .local_cli import REPO, free_ports_values, start_local


def test_make_runs_install_alone_serves_the_readme_examples(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    done = subprocess.run(["make", "-C", str(REPO), f"VENV={venv}", f"{venv}/bin/gateway-extproc"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    installed = subprocess.run([f"{venv}/bin/pip", "list", "--format=freeze"], capture_output=True, text=True).stdout
    assert "pytest" not in installed.lower()  # only make run's install, not the test extra
    local = start_local(venv / "bin" / "gateway-extproc", [free_ports_values(tmp_path)], tmp_path / "run")
    try:
        snippets = subprocess.run([f"{venv}/bin/python", str(REPO / "tests" / "readme_snippets.py"),
                                   str(REPO / "README.md"), "--base", local.url],
                                  capture_output=True, text=True, timeout=600)
        assert snippets.returncode == 0, snippets.stdout + snippets.stderr
        assert "This is a mock reply" in snippets.stdout  # the streamed first call printed text
    finally:
        rc, err = local.stop()
    assert rc == 0, err
