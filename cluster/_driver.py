"""``p11guard sign --dask``: the batch signing job on a Dask cluster, exactly once.

The input is cut into fixed partitions (:mod:`p11guard.cli._partplan`); each is one task,
and its part file in ``--out DIR`` exists if and only if it is done
(:mod:`p11guard.cli._parts`). Against Dask's own behaviour:

- each future is released as soon as it is read (a worker that dies holding a result the
  client still wants makes Dask compute it again), task keys are unique per run, and Dask's
  ``retries`` stay 0: Dask re-runs a task only when its worker died (up to its
  ``allowed-failures``); HSM outages are the guard's business (its queue policy);
- a task that finds its partition done (part file, or the driver's mark in the scheduler's
  metadata) returns without touching the HSM;
- a partition that fails writes nothing and is listed; a re-run does it again.

Before anything is written: the config is checked for the workers (every field, absolute
paths), the paths, the input's partitions and an existing manifest; then the plugin starts
a guard on every worker (a setup error -- a bad PIN file -- surfaces here, once, and
stops the job), a worker resolves the key, and only then is ``DIR`` made.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

from distributed import Client, Future, as_completed

from p11guard.base import Config, ConfigError
from p11guard.cli._partplan import DEFAULT_PARTITION_SIZE, Plan, make_plan, partition_records
from p11guard.cli._parts import Manifest, done_parts, remove_stale_temps, write_part
from p11guard.cli._paths import UsageError, check_distinct, check_output
from p11guard.cli._progress import make_progress
from p11guard.cli._signreport import SignReport
from p11guard.cluster._config import client_config
from p11guard.cluster._connect import open_client
from p11guard.cluster._plugin import PLUGIN_NAME, GuardPlugin, remove_plugin
from p11guard.cluster._task import DONE_KEY, PartResult, PartSpec, resolve_key_task, sign_partition
from p11guard.cluster._watch import Watch

__all__ = ["MAX_PARTITION_SIZE", "sign_on_cluster"]

MAX_PARTITION_SIZE = 1_000_000
#: How long a job waits for the first worker of a cluster.
WAIT_WORKERS_S = 60.0
#: Records shipped with tasks in flight at most (more only if one partition is larger):
#: the client's memory stays bounded whatever the records weigh.
WINDOW_BYTES = 256 * 1024 * 1024


def _check_out_dir(out: Path) -> None:
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise UsageError(f"--out {out} is not a directory: with --dask, --out is a directory of part files")
        if not os.access(out, os.W_OK | os.X_OK):
            raise UsageError(f"--out {out}: directory is not writable: choose another --out")
        return
    check_output(out, "--out")


def _check_resume(out: Path, plan: Plan, key: str, mechanism: str | None) -> Manifest | None:
    """An existing manifest, if its input, partition size, key label and mechanism (when
    given) match this run's; the key's fingerprint is checked once a worker has it."""
    old = Manifest.load(out) if out.is_dir() else None
    if old is not None:
        probe = Manifest(plan.identity, plan.records, plan.partition_size, plan.partitions, key,
                         mechanism or old.mechanism, old.key_sha256)  # fmt: skip
        reason = old.mismatch(probe)
        if reason is not None:
            raise UsageError(f"--out {out} cannot be resumed: {reason}; choose another --out")
    if out.is_dir() and done_parts(out, plan.partitions) and old is None:  # (parts of another input: refused)
        raise UsageError(
            f"--out {out} holds part files but no manifest.json: not this job's output; choose another --out"
        )
    return old


def _register(client: Client, plugin: GuardPlugin) -> None:
    """Start a guard on every worker; a setup error is raised here, once, and the plugin
    is taken off the cluster again (workers that join later would fail it again)."""
    try:
        client.register_plugin(plugin, name=plugin.name)
    except BaseException:
        remove_plugin(client, plugin.name)
        raise


def sign_on_cluster(
    config: str | os.PathLike[str] | Mapping[str, Any] | Config,
    key: str,
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    scheduler: str | Client,
    mechanism: str | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    shared_out: bool = False,
    report_path: str | os.PathLike[str] | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
    plugin_name: str = PLUGIN_NAME,
) -> SignReport:
    """Sign every record of ``source`` not yet in ``out`` (a directory of parts) on the
    Dask cluster ``scheduler`` (``"local:N"``, ``"tcp://host:8786"`` or a ``Client``).

    Returns the same :class:`SignReport` as ``p11guard sign``, with ``partitions`` and
    ``workers`` (each worker's recoveries and outages).

    Raises:
        ConfigError: the config (or a worker's guard start), naming the field.
        UsageError: a path, the partition size, or an ``out`` this run cannot continue.
    """
    source, out = Path(source).absolute(), Path(out).absolute()
    report_file = Path(report_path) if report_path is not None else None
    if not 1 <= partition_size <= MAX_PARTITION_SIZE:
        raise UsageError(f"--partition-size must be between 1 and {MAX_PARTITION_SIZE:,}, not {partition_size}")
    carried, _ = client_config(config)
    _check_out_dir(out)
    if report_file is not None:
        check_output(report_file, "--report", replaced=True)
    check_distinct({"--in": source, "--out": out, "--report": report_file})
    plan = make_plan(source, partition_size)
    old = _check_resume(out, plan, key, mechanism)
    started = time.monotonic()
    if old is not None and len(done_parts(out, plan.partitions)) == plan.partitions:
        # Nothing left: no cluster, no guard, not one HSM operation.
        remove_stale_temps(out)
        report = SignReport(records=plan.records, skipped=plan.records, elapsed_s=0.0)
        report.partitions = {"total": plan.partitions, "size": partition_size, "done_before": plan.partitions,
                             "signed": 0, "skipped": 0, "failed": []}  # fmt: skip
        report.workers = {}
        if report_file is not None:
            report.write(report_file)
        return report
    with open_client(scheduler) as client:
        try:
            client.wait_for_workers(1, timeout=WAIT_WORKERS_S)
        except TimeoutError:
            raise UsageError(
                f"--dask {scheduler}: no Dask worker joined within {WAIT_WORKERS_S:g} s: start `dask worker "
                "SCHEDULER_ADDRESS` on the machines that sign"
            ) from None
        plugin = GuardPlugin(carried, plugin_name)
        _register(client, plugin)
        try:
            run = uuid.uuid4().hex[:12]
            _, mech, fingerprint = client.submit(
                resolve_key_task, plugin_name, key, mechanism, key=f"p11guard-key-{run}", pure=False
            ).result()
            manifest = Manifest(plan.identity, plan.records, partition_size, plan.partitions, key, mech, fingerprint)
            if old is not None and (reason := old.mismatch(manifest)) is not None:
                raise UsageError(f"--out {out} cannot be resumed: {reason}; choose another --out")
            out.mkdir(exist_ok=True)
            if old is None:
                manifest.write(out)
            remove_stale_temps(out)
            job = _Job(client, plan, manifest, out, shared_out, plugin_name, run)
            progress = make_progress(plan.records, f"signing with {key} on Dask", quiet, stream)
            watch = Watch(client, plugin_name, progress, plan.partitions).start()
            try:
                job.run(watch)
            finally:
                job.report.workers = watch.finish()
                progress.close()
                try:
                    client.set_metadata([DONE_KEY, run], None)
                except Exception:
                    pass
        finally:
            remove_plugin(client, plugin_name)
    report = job.report
    workers = report.workers or {}
    report.recoveries = sum(w["recoveries"] for w in workers.values())
    report.outage_s = max((w["outage_s"] for w in workers.values()), default=0.0)
    report.elapsed_s = round(time.monotonic() - started, 3)
    report.ops_per_s = round(report.signed / report.elapsed_s, 1) if report.elapsed_s else 0.0
    if report_file is not None:
        report.write(report_file)
    return report


class _Job:
    """One run: a window of partitions in flight, each result taken as it completes."""

    def __init__(
        self, client: Client, plan: Plan, manifest: Manifest, out: Path, shared: bool, plugin: str, run: str
    ) -> None:
        self.client, self.plan, self.manifest, self.out = client, plan, manifest, out
        self.shared, self.plugin, self.run_id = shared, plugin, run
        threads = sum(client.nthreads().values())
        self.window = max(4, 2 * threads)
        self.inflight: dict[Any, tuple[int, Future[PartResult], int]] = {}  # by task key: k, future, bytes
        self.shipped = 0  # bytes of records in flight
        done = done_parts(out, plan.partitions)
        self.todo = [k for k in range(plan.partitions) if k not in done]
        before = sum(self._count(k) for k in done)
        self.report = SignReport(records=plan.records, skipped=before)
        self.report.partitions = {
            "total": plan.partitions,
            "size": plan.partition_size,
            "done_before": len(done),
            "signed": 0,
            "skipped": 0,
            "failed": [],
        }
        self.watch: Watch | None = None

    def _count(self, k: int) -> int:
        start, end = self.plan.bounds(k)
        return end - start

    def _fail(self, k: int, reason: str, records: list[tuple[str, str]] | None = None) -> None:
        count = self._count(k)
        start, end = self.plan.bounds(k)
        self.report.failed += count
        assert self.report.partitions is not None
        self.report.partitions["failed"].append({"k": k, "records": f"{start + 1}..{end}", "reason": reason})
        by_reason: dict[str, list[str]] = {}
        for rid, why in records or []:
            by_reason.setdefault(why, []).append(rid)
        if len(by_reason) == 1 and len(records or []) == count:  # one cause for all (a loss): one line
            reason = f"{count} of its records: {next(iter(by_reason))}; nothing written"
        else:  # a record of its own (too large, unreadable) is named; many with one cause, together
            for why, ids in by_reason.items():
                rid = ids[0] if len(ids) == 1 else f"{len(ids)} records, {ids[0]} .. {ids[-1]}"
                self.report.failures.append({"id": rid, "reason": why})
        self.report.failures.append({"id": f"partition {k} (records {start + 1}..{end})", "reason": reason})
        if self.watch is not None:
            self.watch.record(0, failed=True)

    def _spec(self, k: int) -> PartSpec:
        start, end = self.plan.bounds(k)
        m = self.manifest
        spec = PartSpec(self.run_id, k, m.key, m.mechanism, m.key_sha256, self.plugin, lines=self.plan.lines,
                        first=start + 1, count=end - start)  # fmt: skip
        if not self.shared:
            return spec
        ident = self.plan.identity
        return replace(
            spec,
            shared_out=str(self.out),
            source=str(self.plan.source),
            offset=self.plan.offsets[k] if self.plan.lines else 0,
            stamp=(ident["size"], ident["mtime_ns"]) if self.plan.lines else None,
            files=tuple((f[0], f[1], f[2]) for f in self.plan.files[start:end]),
        )

    def _submit(self, k: int) -> Future[PartResult] | None:
        shipped: list[tuple[str, bytes]] | None = None
        if not self.shared:
            records = list(partition_records(self.plan, k))
            bad = [(r.id, r.error or "not read") for r in records if r.data is None]
            if bad:
                self._fail(k, f"{len(bad)} of its records cannot be signed: nothing written", bad)
                return None
            shipped = [(r.id, r.data) for r in records if r.data is not None]
        future = self.client.submit(
            sign_partition, self._spec(k), shipped, key=f"p11guard-part-{self.run_id}-{k:05d}", pure=False, retries=0
        )
        size = sum(len(data) for _, data in shipped or [])
        self.inflight[future.key] = (k, future, size)
        self.shipped += size
        return future

    def run(self, watch: Watch) -> None:
        self.watch = watch
        todo = iter(self.todo)
        pending = as_completed()

        def fill() -> None:
            while pending.count() < self.window and (self.shipped < WINDOW_BYTES or not pending.count()):
                k = next(todo, None)
                if k is None:
                    return
                future = self._submit(k)
                if future is not None:
                    pending.add(future)

        fill()
        try:
            for future in pending:
                self._take(future)
                fill()
        except BaseException:
            self.client.cancel([f for _, f, _ in self.inflight.values()], reason="p11guard: the job stopped")
            self.inflight.clear()
            raise

    def _take(self, future: Future[PartResult]) -> None:
        k, _, size = self.inflight.pop(future.key)
        self.shipped -= size
        try:
            result: PartResult = future.result()
        except Exception as exc:  # KilledWorker (its worker died allowed-failures times), ...
            future.release()
            self._fail(k, f"{type(exc).__name__}: {exc}")
            return
        future.release()  # Dask would recompute it if its worker died now
        assert self.report.partitions is not None and self.watch is not None
        if result.status == "fatal":
            raise ConfigError(f"stopped: a worker cannot sign: {result.reason}")
        if result.status == "failed":
            self._fail(k, result.reason or f"{len(result.failures)} of its records failed: nothing written",
                       result.failures)  # fmt: skip
            return
        if result.status == "skipped":
            self.report.partitions["skipped"] += 1
            self.report.skipped += self._count(k)
        else:
            if result.lines is not None:
                write_part(self.out, k, result.lines)
                self.client.set_metadata([DONE_KEY, self.run_id, str(k)], True)
            self.report.partitions["signed"] += 1
            self.report.signed += result.signed
        self.watch.record(self._count(k))
