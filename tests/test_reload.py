"""Config reload reads a changed gateway.yaml only once it has stood still."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import yaml

from gateway_extproc.reload import RuntimeRef
from gateway_extproc.runtime import Runtime

from .test_config import valid


async def test_a_file_still_being_written_is_read_once_it_stands_still(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    ref = RuntimeRef(Runtime.load(path), str(path))
    doc = valid()
    doc["maxRequestBytes"] = 8192
    text = yaml.safe_dump(doc)
    # The first part of the new file, just written (a valid prefix would load as a config of
    # its own), then the rest while the watcher looks.
    path.write_text(text[: len(text) // 2])
    check = asyncio.create_task(ref.check())
    await asyncio.sleep(0.3)
    path.write_text(text)
    await asyncio.wait_for(check, 5)
    assert ref.current.config.max_request_bytes == 8192
    assert ref.current.config.digest == hashlib.sha256(text.encode()).hexdigest()
