"""Config reload reads a changed gateway.yaml only once it has stood still."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
from pathlib import Path

import pytest
import yaml

from gateway_extproc.config import ConfigError

from gateway_extproc import reload
from gateway_extproc.reload import RuntimeRef
from gateway_extproc.runtime import Runtime

from .test_config import valid


async def a_good_file_applies(ref: RuntimeRef, path: Path, mtime: int) -> None:
    """A valid change (`maxRequestBytes` 8192, written at `mtime`, long stood still) applies."""
    doc = valid()
    doc["maxRequestBytes"] = 8192
    path.write_text(yaml.safe_dump(doc))
    os.utime(path, (mtime, mtime))
    await ref.check()
    assert ref.current.config.max_request_bytes == 8192


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


def test_the_budget_gauge_shows_the_config_in_force(tmp_path: Path) -> None:
    """genai_gateway_team_daily_budget_dollars (which the cost alerts compare spend against) is
    the budget of the config serving: a reload that is rejected leaves it, and a team whose daily
    budget was removed loses its series instead of alerting against the old limit forever."""
    import pytest
    from prometheus_client import REGISTRY

    from gateway_extproc import config
    from gateway_extproc.config import ConfigError

    def doc(search: float, ads: float | None) -> dict:
        d = valid()
        d["listen"] = d["listen"][:1]
        for model in d["models"]:
            for backend in model["backends"]:
                backend["pricing"] = {"input": 1.0, "output": 1.0}
        d["budgets"] = {"org": "o", "devMemoryStore": True}
        d["teams"] = [{"name": "search", "budget": {"daily": search}},
                      {"name": "ads", **({"budget": {"daily": ads}} if ads is not None else {})}]
        return d

    def gauge(team: str) -> float | None:
        return REGISTRY.get_sample_value("genai_gateway_team_daily_budget_dollars", {"team": team})

    serving = Runtime.from_config(config.parse(doc(5, 3), "a.yaml"))
    assert (gauge("search"), gauge("ads")) == (5, 3)
    rejected = doc(50, 3)  # valid YAML and schema; refused when its classification rules compile
    rejected["classification"] = {"tiers": ["low", "high"], "contentLogging": {"maxTier": "none"}}
    for model in rejected["models"]:
        for backend in model["backends"]:
            backend["maxTier"] = "high"
    with pytest.raises(ConfigError):
        Runtime.from_config(config.parse(rejected, "b.yaml"), serving)
    assert (gauge("search"), gauge("ads")) == (5, 3)
    from gateway_extproc.telemetry import metrics
    metrics.TEAM_DAILY_REMAINING.labels("ads").set(1.5)  # as enforcing its budget left it
    Runtime.from_config(config.parse(doc(5, None), "c.yaml"), serving)
    assert (gauge("search"), gauge("ads")) == (5, None)
    assert REGISTRY.get_sample_value("genai_team_daily_budget_remaining_dollars", {"team": "ads"}) is None


async def test_a_tokenizer_file_that_does_not_load_is_rejected_and_the_watcher_keeps_watching(tmp_path: Path) -> None:
    """A tokenizer.json that exists but is no tokenizer (tokenizers raises a bare Exception)
    was neither a ConfigError nor an OSError: it escaped check() and ended the watch task, so
    that worker never reloaded again (a later revocation never applied)."""
    from prometheus_client import REGISTRY

    def rejected() -> float:
        return REGISTRY.get_sample_value("genai_gateway_config_reloads_total", {"result": "rejected"}) or 0.0

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    ref = RuntimeRef(Runtime.load(path), str(path))
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    doc = valid()
    doc["models"][0]["tokenizer"] = str(tmp_path / "tokenizer.json")
    path.write_text(yaml.safe_dump(doc))
    os.utime(path, (2, 2))
    before = rejected()
    await ref.check()
    assert rejected() == before + 1
    assert ref.current.config.models["default-chat"].tokenizer == "o200k_base"  # the last good config
    await a_good_file_applies(ref, path, 3)


async def test_whatever_a_reload_raises_the_watcher_survives_and_counts_it(tmp_path: Path, monkeypatch) -> None:
    """Defence in depth: an unexpected exception while loading is a rejected file, never the
    end of the watch loop."""
    from gateway_extproc import reload

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    ref = RuntimeRef(Runtime.load(path), str(path))
    real = Runtime.load

    def boom(*args, **kwargs):
        raise RuntimeError("unexpected")
    monkeypatch.setattr(reload.Runtime, "load", boom)
    os.utime(path, (2, 2))
    await ref.check()
    monkeypatch.setattr(reload.Runtime, "load", real)
    await a_good_file_applies(ref, path, 3)


async def test_a_symlink_switched_to_a_file_of_the_same_mtime_is_reloaded(tmp_path: Path) -> None:
    """Config directories switched by a symlink (blue/green, `ln -sfn v2 current`) whose files
    carry the same modification time (unpacked from one archive, copied with `cp -p`): the
    watcher compared the mtime only and never saw the switch. A revocation in v2 never applied."""
    v1, v2 = tmp_path / "v1.yaml", tmp_path / "v2.yaml"
    v1.write_text(yaml.safe_dump(valid()))
    doc = valid()
    doc["keys"] = doc["keys"][:1]  # ads-1 revoked
    v2.write_text(yaml.safe_dump(doc))
    for f in (v1, v2):
        os.utime(f, (1000, 1000))
    link = tmp_path / "gateway.yaml"
    link.symlink_to(v1)
    ref = RuntimeRef(Runtime.load(link), str(link))
    assert "ads-1" in ref.current.config.keys
    tmp = tmp_path / "gateway.yaml.new"
    tmp.symlink_to(v2)
    os.replace(tmp, link)
    await ref.check()
    assert "ads-1" not in ref.current.config.keys


async def test_a_rewrite_in_place_within_one_timestamp_tick_is_reloaded(tmp_path: Path) -> None:
    """A file system with coarse timestamps (or a writer that restores them) gives the new
    file the old mtime: its size still tells it apart."""
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1000, 1000))
    ref = RuntimeRef(Runtime.load(path), str(path))
    doc = valid()
    doc["keys"] = doc["keys"][:1]
    path.write_text(yaml.safe_dump(doc))
    os.utime(path, (1000, 1000))
    await ref.check()
    assert "ads-1" not in ref.current.config.keys


async def test_a_reload_lets_the_collector_free_what_the_start_up_heap_held_in_a_cycle(tmp_path: Path) -> None:
    """`serve` freezes its start-up heap out of the cyclic collector (server.quiet_collector);
    a reload unfreezes it, else the replaced Runtime, where it sits in a reference cycle,
    would never be freed."""
    import gc
    import weakref

    from gateway_extproc.server import quiet_collector

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    ref = RuntimeRef(Runtime.load(path), str(path))

    class Held:
        pass

    held = Held()
    held.runtime, held.itself = ref.current, held  # type: ignore[attr-defined]
    probe = weakref.ref(held)
    threshold = gc.get_threshold()
    try:
        quiet_collector()
        del held  # garbage now, in a cycle the freeze took in
        gc.collect()
        assert probe() is not None and gc.get_freeze_count() > 0  # frozen: no collection frees it
        await a_good_file_applies(ref, path, 2)  # (long stood still)
        gc.collect()
        assert probe() is None and gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


async def test_the_reload_gauges_say_whether_the_file_on_disk_is_the_config_in_force(tmp_path: Path) -> None:
    """genai_gateway_config_reloads_total{result="rejected"} counts rejected changes, but only
    a gauge says "the file on disk is being refused right now" (as Prometheus's own
    prometheus_config_last_reload_successful): 1 from start-up, 0 while the last change was
    rejected, 1 again once a change applies; its timestamp is that of the last load that worked."""
    import time

    from prometheus_client import REGISTRY

    def successful() -> float | None:
        return REGISTRY.get_sample_value("genai_gateway_config_last_reload_successful")

    def succeeded_at() -> float | None:
        return REGISTRY.get_sample_value("genai_gateway_config_last_reload_success_timestamp_seconds")

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    started = time.time()
    ref = RuntimeRef(Runtime.load(path), str(path))
    assert successful() == 1
    loaded_at = succeeded_at()
    assert loaded_at is not None and started <= loaded_at <= time.time()

    path.write_text("version: 1\nlisten: [")  # a broken edit
    os.utime(path, (2, 2))
    await ref.check()
    assert successful() == 0
    assert succeeded_at() == loaded_at  # the config in force is still the one loaded then
    await ref.check()  # nothing changed since: still refused
    assert successful() == 0

    await a_good_file_applies(ref, path, 3)
    assert successful() == 1
    assert succeeded_at() > loaded_at

    path.unlink()  # the file gone is no config in force either
    await ref.check()
    assert successful() == 0


async def test_a_nudge_reads_the_file_now_not_at_the_next_poll(tmp_path: Path, monkeypatch) -> None:
    """SIGHUP calls `nudge`: a changed file applies at once, and a storm of nudges while a
    check runs costs one more check, not one each."""
    monkeypatch.setattr(reload, "POLL_SECONDS", 3600.0)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(valid()))
    os.utime(path, (1, 1))
    ref = RuntimeRef(Runtime.load(path), str(path))
    checks = 0
    real_stat = reload._stat

    def counted(p: str) -> tuple[tuple[int, int, int, int] | None, float]:
        nonlocal checks
        checks += 1
        return real_stat(p)

    monkeypatch.setattr(reload, "_stat", counted)
    watcher = asyncio.create_task(ref.watch())
    try:
        await asyncio.sleep(0.05)
        doc = valid()
        doc["maxRequestBytes"] = 8192
        path.write_text(yaml.safe_dump(doc))
        os.utime(path, (2, 2))
        for _ in range(50):
            ref.nudge()
        for _ in range(100):
            if ref.current.config.max_request_bytes == 8192:
                break
            await asyncio.sleep(0.02)
        assert ref.current.config.max_request_bytes == 8192
        await asyncio.sleep(0.1)
        assert checks <= 2
    finally:
        watcher.cancel()


@pytest.mark.parametrize(("where", "value"), [
    (("providers", 1, "credential", "file"), "/run/secrets/az\x00ure"),
    (("identity", "keyAdmin", "file"), "/var/lib/keys\x00.json"),
    (("identity", "keyAdmin", "file"), 5),
    (("identity", "keyAdmin", "file"), ["/var/lib/keys.json"]),
])
async def test_a_file_path_no_file_can_have_is_a_config_error_naming_its_key(tmp_path: Path, where: tuple,
                                                                            value: object) -> None:
    """A NUL in a path (or a path that is no string) raised ValueError/TypeError from the
    file system call: `serve` stopped with a traceback, a reload logged 'embedded null byte'
    with no key, and a NUL in keyAdmin.file failed requests at run time."""
    doc = valid()
    doc["identity"] = {"keyAdmin": {"enabled": True, "file": str(tmp_path / "keys.json"),
                                    "admins": [{"name": "root", "sha256": "0" * 64}]}}
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    node = doc
    for step in where[:-1]:
        node = node[step]
    node[where[-1]] = value
    key = "providers[1].credential.file" if where[0] == "providers" else "identity.keyAdmin.file"
    with pytest.raises(ConfigError, match=re.escape(key)):
        Runtime.load(_written(tmp_path / "bad.yaml", doc))


def _written(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path
