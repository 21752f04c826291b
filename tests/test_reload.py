"""Config reload reads a changed gateway.yaml only once it has stood still."""

from __future__ import annotations

import os
import time
from pathlib import Path

import yaml

from gateway_extproc.reload import SETTLE_SECONDS, RuntimeRef
from gateway_extproc.runtime import Runtime

from .test_config import valid


async def test_a_file_still_being_written_is_read_at_a_later_poll(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    ref = RuntimeRef(Runtime.load(path), str(path))
    doc = valid()
    doc["maxRequestBytes"] = 8192
    text = yaml.safe_dump(doc)
    # Half of the new file, just written: a valid prefix would load as a config of its own.
    path.write_text(text[: text.index("keys:")] if "keys:" in text else text[: len(text) // 2])
    await ref.check()
    assert ref.current.config.max_request_bytes != 8192
    path.write_text(text)
    await ref.check()  # the rest of it, still fresh
    assert ref.current.config.max_request_bytes != 8192
    old = time.time() - SETTLE_SECONDS - 1
    os.utime(path, (old, old))  # it has stood still
    await ref.check()
    assert ref.current.config.max_request_bytes == 8192
