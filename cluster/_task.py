"""What runs on a Dask worker: sign one partition, resolve the key, report the guard.

:func:`sign_partition` first asks whether its partition is done already -- its part file
exists (``--shared-out``), or the driver marked it done in the scheduler's metadata after
writing it -- and if so returns at once without touching the HSM: that is what a
recomputation by Dask (a worker died holding a result the client had not released) finds.
Otherwise it signs every record through the worker's guard, in batches, and either writes
the part itself (``--shared-out``) or returns its lines for the driver to write. A
partition with any record that could not be signed writes nothing and returns why.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import get_client, get_worker

from p11guard.base import AuthError, ConfigError, P11GuardError
from p11guard.cli._keyinfo import key_fingerprint, resolve_key
from p11guard.cli._parts import part_name, write_part
from p11guard.cli._paths import read_regular
from p11guard.cli._records import MAX_RECORD, Record, read_lines, signature_line
from p11guard.cli._signjob import batches
from p11guard.cluster._plugin import PLUGIN_NAME, worker_plugin

__all__ = ["DONE_KEY", "PartResult", "PartSpec", "resolve_key_task", "sign_partition", "worker_view"]

#: Scheduler metadata: ``[DONE_KEY, run, str(k)]`` is set once partition ``k``'s part is written.
DONE_KEY = "p11guard-done"
#: Errors that no partition can get past: the job stops (exit 2).
FATAL = (ConfigError, AuthError)


@dataclass(frozen=True)
class PartSpec:
    """One partition's task.

    ``records`` (default) are shipped by the driver with the task; with ``shared_out``
    the worker reads ``source`` itself: a file from byte ``offset`` (``stamp``: the size and
    ``mtime_ns`` the driver saw), or the ``files`` ``(id, size, mtime_ns)`` of a directory.
    """

    run: str
    k: int
    key: str
    mechanism: str
    key_sha256: str | None
    plugin: str = PLUGIN_NAME
    shared_out: str | None = None
    source: str | None = None
    lines: bool = True
    first: int = 1
    count: int = 0
    offset: int = 0
    stamp: tuple[int, int] | None = None
    files: tuple[tuple[str, int, int], ...] = ()


@dataclass
class PartResult:
    """What a partition's task did. ``status``: ``signed``, ``skipped`` (done before),
    ``failed`` (``failures`` name each record), or ``fatal`` (``reason``: the job stops)."""

    k: int
    status: str
    signed: int = 0
    lines: bytes | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""
    worker: str = ""
    pid: int = 0
    hsm_ops: int = 0
    seconds: float = 0.0


def _done(spec: PartSpec) -> bool:
    if spec.shared_out is not None:
        return (Path(spec.shared_out) / part_name(spec.k)).exists()
    value = get_client().get_metadata([DONE_KEY, spec.run, str(spec.k)], default=False)
    return bool(value)


def _shared_records(spec: PartSpec) -> Iterator[Record]:
    assert spec.source is not None
    source = Path(spec.source)
    if spec.lines:
        info = source.stat()
        if spec.stamp is not None and (info.st_size, info.st_mtime_ns) != spec.stamp:
            raise ConfigError(
                f"--in {source} on this worker is not the client's (size, mtime_ns {spec.stamp} there, "
                f"{(info.st_size, info.st_mtime_ns)} here): --shared-out needs the same input on shared storage"
            )
        yield from read_lines(source, spec.offset, spec.first, spec.count)
        return
    for rid, size, mtime in spec.files:
        path = source / rid
        data, error = read_regular(path, MAX_RECORD)
        try:
            info = path.lstat()
            changed = (info.st_size, info.st_mtime_ns) != (size, mtime)
        except OSError:
            changed = True
        if error is None and changed:
            data, error = None, f"{path} changed since the client listed it (or is not the client's): not signed"
        yield Record(rid, data, error)


def sign_partition(spec: PartSpec, shipped: list[tuple[str, bytes]] | None = None) -> PartResult:
    """Sign partition ``spec.k`` on this worker (see the module)."""
    started = time.monotonic()
    worker = get_worker()
    result = PartResult(spec.k, "signed", worker=worker.address, pid=os.getpid())
    try:
        if _done(spec):
            result.status = "skipped"
            return result
        shared = shipped is None
        records = list(_shared_records(spec)) if shared else [Record(rid, data) for rid, data in shipped or []]
        result.failures = [(r.id, r.error or "not read") for r in records if r.data is None]
        if result.failures:
            result.status = "failed"
            return result
        guard = worker_plugin(spec.plugin).guard()
        pending = []
        for batch in batches(records, guard.config.batch_size):
            items = [("sign", {"key": spec.key, "data": r.data, "mechanism": spec.mechanism}) for r in batch]
            pending.append((batch, guard.submit_batch(items)))
            result.hsm_ops += len(batch)
        lines = []
        for batch, future in pending:
            try:
                answers = future.result()
            except P11GuardError as exc:
                answers = [exc] * len(batch)
            for record, answer in zip(batch, answers, strict=True):
                if isinstance(answer, BaseException):
                    result.failures.append((record.id, str(answer)))
                else:
                    assert record.data is not None
                    lines.append(
                        signature_line(record.id, record.data, answer, spec.key, spec.mechanism, spec.key_sha256)
                    )
        if result.failures:
            result.status = "failed"
            return result
        data = b"".join(lines)
        if spec.shared_out is not None:
            write_part(Path(spec.shared_out), spec.k, data)
        else:
            result.lines = data
        result.signed = len(lines)
        return result
    except FATAL as exc:
        result.status, result.reason = "fatal", str(exc)
        return result
    except (P11GuardError, OSError, LookupError) as exc:
        result.status, result.reason = "failed", f"{type(exc).__name__}: {exc}"
        return result
    finally:
        result.seconds = round(time.monotonic() - started, 3)


def resolve_key_task(plugin: str, key: str, mechanism: str | None) -> tuple[str, str, str | None]:
    """On a worker: the key's type, the mechanism, the key's fingerprint (see
    :func:`p11guard.cli._keyinfo.resolve_key`)."""
    guard = worker_plugin(plugin).guard()
    key_type, mech = resolve_key(guard, key, mechanism)
    return key_type, mech, key_fingerprint(guard, key, key_type)


async def worker_view(dask_worker: Any, plugin: str = PLUGIN_NAME, full: bool = False) -> dict[str, Any]:
    """For ``Client.run``: the worker's guard as :meth:`GuardPlugin.view` sees it."""
    found = dask_worker.plugins.get(plugin)
    if found is None:
        return {"state": "NONE", "error": f"no plugin {plugin!r}"}
    view: dict[str, Any] = await asyncio.to_thread(found.view, full)
    view["name"] = str(dask_worker.name)
    return view
