"""The batch signing job on a Dask cluster: exactly once through group losses and dead workers.

A LocalCluster of 2 worker processes (each under a Nanny) is shared by the module; the
testbed's network group is the HSM. Every signature is checked with ``p11guard verify``.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from cluster_helpers import Cluster, Descendants, Job, all_gone, parts, records
from distributed import Future

from conftest import EC_KEY, child_env, gone, repo_root, wait_until
from p11guard.base import Config, ConfigError
from p11guard.cli._partplan import make_plan, partition_records
from p11guard.cli._paths import UsageError
from p11guard.cli._verify import run_verify
from p11guard.cluster import (
    GuardPlugin,
    PartResult,
    PartSpec,
    open_client,
    remove_plugin,
    sign_on_cluster,
    sign_partition,
)
from p11guard.testbed import Testbed

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def dask_cluster() -> Iterator[Cluster]:
    cluster = Cluster(2)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def cluster(dask_cluster: Cluster, group: Testbed) -> Cluster:
    """The module's cluster with both workers up, no p11guard plugin left on it."""
    dask_cluster.ready()
    left = dask_cluster.client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert not [n for names in left.values() for n in names if n.startswith("p11guard")], left
    return dask_cluster


@pytest.fixture(scope="module")
def pubkey(tmp_path_factory: pytest.TempPathFactory, bed: Testbed) -> Path:
    from cli_helpers import write_pubkey

    return write_pubkey(bed, tmp_path_factory.mktemp("pub") / "pub.pem")


def config_dict(bed: Testbed, **group: Any) -> dict[str, Any]:
    data = tomllib.loads(bed.config_path.read_text())
    data["group"].update(group)
    return data


def verified(source: Path, out: Path, pubkey: Path) -> None:
    report = run_verify(source, out, pubkey)
    assert report.ok, report.summary()


def sessions(bed: Testbed) -> int:
    """HSM sessions of one Dask worker: its guard's workers and its probe."""
    return Config.from_file(bed.config_path).workers + 1


def accepted(bed: Testbed) -> int:
    """Connections the testbed's proxy has taken: every guard start, host and probe opens one."""
    return int(bed.status()["fault"]["accepted"])


def test_outage_every_record_once_one_recovery_per_worker(
    cluster: Cluster, group: Testbed, tmp_path: Path, pubkey: Path
) -> None:
    source, out = records(tmp_path, 20_000), tmp_path / "sigs"
    job = Job(str(group.config_path), EC_KEY, source, out, scheduler=cluster.client, quiet=True)
    job.start()
    wait_until(lambda: len(parts(out)) >= 2, 60, "2 partitions signed")
    group.fault("lose")
    restore = threading.Timer(3.0, group.fault, ("restore",))
    restore.start()
    try:
        report = job.result(80)
    finally:
        restore.cancel()
        group.fault("restore")
    assert report.ok and report.signed == 20_000 - report.skipped and report.skipped == 0, report.summary()
    assert report.partitions is not None and report.partitions["signed"] == 10
    assert report.workers is not None and len(report.workers) == 2
    assert [w["recoveries"] for w in report.workers.values()] == [1, 1], report.workers
    assert all(w["outages"] == 1 for w in report.workers.values())
    verified(source, out, pubkey)

    # Complete output: a re-run signs nothing and opens no connection to the HSM.
    before, mtimes = accepted(group), {p: p.stat().st_mtime_ns for p in parts(out)}
    again = sign_on_cluster(str(group.config_path), EC_KEY, source, out, scheduler=cluster.client, quiet=True)
    assert (again.signed, again.skipped, again.ok) == (0, 20_000, True)
    assert accepted(group) == before
    assert {p: p.stat().st_mtime_ns for p in parts(out)} == mtimes


def test_worker_killed_mid_run_its_hosts_die_output_exactly_once(
    cluster: Cluster, group: Testbed, tmp_path: Path, pubkey: Path
) -> None:
    source, out = records(tmp_path, 4_000), tmp_path / "sigs"
    group.fault("latency", 1)  # long enough a run to kill a worker in the middle of it
    # --shared-out: the workers read --in and write the parts themselves
    job = Job(str(group.config_path), EC_KEY, source, out, scheduler=cluster.client, quiet=True,
              partition_size=250, shared_out=True)  # fmt: skip
    job.start()
    wait_until(lambda: len(parts(out)) >= 2, 60, "2 partitions signed")
    views = cluster.views()
    address = max(views, key=lambda a: len(views[a].get("hosts", {})))
    pid, hosts = cluster.kill_worker(address)
    assert len(hosts) == sessions(group)  # its guard's workers and the probe
    assert len(parts(out)) < 16, "the run ended before the kill: make it longer"
    all_gone([pid, *hosts], 5, "the killed worker or one of its hosts")
    report = job.result(80)
    assert report.ok and report.signed == 4_000, report.summary()
    assert report.workers is not None and any(w["gone"] for w in report.workers.values()), report.workers
    verified(source, out, pubkey)
    lines = [json.loads(line) for p in parts(out) for line in p.read_bytes().splitlines()]
    assert sorted(int(e["id"]) for e in lines) == list(range(1, 4_001))


def test_held_futures_recomputed_after_a_worker_dies_skip_without_hsm(
    cluster: Cluster, group: Testbed, tmp_path: Path
) -> None:
    """Dask recomputes a dead worker's finished tasks while the client holds their futures:
    the recomputed partitions find themselves done and sign nothing. Even partitions are
    --shared-out (the worker wrote the part), odd ones shipped (the driver wrote the part and
    marked it done in the scheduler's metadata, as ``sign_on_cluster`` does)."""
    from p11guard.cli._parts import write_part
    from p11guard.cluster._task import DONE_KEY

    source, out = records(tmp_path, 1_200), tmp_path / "sigs"
    out.mkdir()
    plan = make_plan(source, 100)
    client = cluster.client
    client.register_plugin(GuardPlugin(str(group.config_path)))
    try:
        futures: list[Future[PartResult]] = []
        for k in range(plan.partitions):
            start, end = plan.bounds(k)
            spec = PartSpec("held", k, EC_KEY, "ecdsa-sha256", None, first=start + 1, count=end - start)
            if k % 2 == 0:
                spec = replace(spec, shared_out=str(out), source=str(source), offset=plan.offsets[k])
                futures.append(client.submit(sign_partition, spec, key=f"held-{k}", pure=False))
            else:
                shipped = [(r.id, r.data) for r in partition_records(plan, k)]
                futures.append(client.submit(sign_partition, spec, shipped, key=f"held-{k}", pure=False))
        first = [f.result() for f in futures]
        assert [r.status for r in first] == ["signed"] * 12 and sum(r.hsm_ops for r in first) == 1_200
        for k, result in enumerate(first):
            if result.lines is not None:
                write_part(out, k, result.lines)
                client.set_metadata([DONE_KEY, "held", str(k)], True)
        assert len(parts(out)) == 12
        mtimes = {p: p.stat().st_mtime_ns for p in parts(out)}
        holders = client.who_has(futures)
        victim = max(cluster.views(), key=lambda a: sum(a in w for w in holders.values()))
        lost = [f for f in futures if victim in holders[f.key]]
        assert lost, holders
        cluster.kill_worker(victim)
        wait_until(lambda: all(f.status == "finished" and victim not in client.who_has([f])[f.key] for f in lost),
                   60, "the lost partitions recomputed elsewhere")  # fmt: skip
        again = [f.result() for f in lost]
        assert [r.status for r in again] == ["skipped"] * len(lost)
        assert sum(r.hsm_ops for r in again) == 0 and {r.worker for r in again}.isdisjoint({victim})
        assert {p: p.stat().st_mtime_ns for p in parts(out)} == mtimes
    finally:
        cluster.ready()  # the killed worker back: it joined with the plugin, which goes now
        remove_plugin(client)
        client.set_metadata([DONE_KEY, "held"], None)


def test_driver_killed_leaves_no_process_and_a_rerun_resumes(
    group: Testbed, tmp_path: Path, pubkey: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import run

    source, out = records(tmp_path, 6_000), tmp_path / "sigs"
    group.fault("latency", 1)
    argv = [sys.executable, "-m", "p11guard", "sign", "--config", str(group.config_path), "--key", EC_KEY,
            "--in", str(source), "--out", str(out), "--dask", "local:2", "--partition-size", "500",
            "--quiet"]  # fmt: skip
    driver = subprocess.Popen(argv, cwd=repo_root(), env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: len(parts(out)) >= 2 or driver.poll() is not None, 60, "2 partitions signed")
        assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
        import psutil

        family = [p.pid for p in psutil.Process(driver.pid).children(recursive=True)]
        hosts = [p for p in family if "--parent" in psutil.Process(p).cmdline()]
        assert len(hosts) >= 2 * sessions(group), [psutil.Process(p).cmdline() for p in family]
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(10)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait(10)
    all_gone(family, 15, "a process of the killed driver's cluster")
    done = len(parts(out))
    assert 2 <= done < 12
    (out / ".part-00011.jsonl.0123456789abcdef0123456789abcdef.tmp").write_bytes(b"torn")
    merged = tmp_path / "merged.jsonl"
    status, stdout, _ = run(capsys, ["merge", str(out), "--out", str(merged)])
    assert status == 1 and f"merged {done} part(s)" in stdout and "missing partitions: " in stdout, stdout
    assert len(merged.read_bytes().splitlines()) == done * 500

    group.fault("latency", 0)
    with Descendants() as started:
        report = sign_on_cluster(str(group.config_path), EC_KEY, source, out, scheduler="local:2", quiet=True,
                                 partition_size=500)  # fmt: skip
    assert report.ok and report.skipped == done * 500 and report.signed == 6_000 - done * 500, report.summary()
    assert report.partitions is not None and report.partitions["done_before"] == done
    assert not list(out.glob(".*.tmp"))
    verified(source, out, pubkey)
    assert run(capsys, ["merge", str(out), "--out", str(merged)])[0] == 0
    verified(source, merged, pubkey)  # one file, in record order
    assert [int(json.loads(line)["id"]) for line in merged.read_bytes().splitlines()] == list(range(1, 6_001))
    assert started.seen, "the local cluster started no process?"
    # multiprocessing's resource tracker serves this process for its whole life, not the cluster
    left = {pid: cmd for pid, cmd in started.seen.items() if not gone(pid) and "resource_tracker" not in cmd}
    assert not left, left


def test_bad_pin_file_fails_at_registration_naming_the_field(cluster: Cluster, group: Testbed, tmp_path: Path) -> None:
    source, out = records(tmp_path, 10), tmp_path / "sigs"
    bad = config_dict(group, pin_file=str(tmp_path / "no-such.pin"))
    with pytest.raises(ConfigError) as info:
        sign_on_cluster(bad, EC_KEY, source, out, scheduler=cluster.client, quiet=True)
    assert info.value.field == "group.pin_file" and "no-such.pin" in str(info.value)
    assert not out.exists()
    left = cluster.client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert not [n for names in left.values() for n in names if n.startswith("p11guard")]
    # a relative path is refused in the client, before the cluster is asked
    with pytest.raises(ConfigError) as info:
        sign_on_cluster(config_dict(group, pin_file="user.pin"), EC_KEY, source, out, scheduler="tcp://127.0.0.1:9")
    assert info.value.field == "group.pin_file" and "absolute" in str(info.value)


def test_the_plugin_carries_no_pin_and_replaces_a_closed_guard(group: Testbed) -> None:
    pin = group.pin.reveal().encode()
    by_env = config_dict(group, pin_env="P11GUARD_TEST_PIN")
    del by_env["group"]["pin_file"]
    plugin = GuardPlugin(str(group.config_path))
    plugin._start()  # a guard, as setup starts it on a worker
    try:
        first = plugin.guard()
        for p in (plugin, GuardPlugin(by_env)):
            for blob in (pickle.dumps(p), cloudpickle.dumps(p)):
                assert pin not in blob
        copy = pickle.loads(pickle.dumps(plugin))
        assert copy.config == plugin.config and copy._guard is None
        first.close()
        second = plugin.guard()  # CLOSED: replaced at its next use
        assert second is not first and second.state == "SERVING"
        assert second.sign(EC_KEY, b"x")
        hosts = list(second.host_pids().values())
    finally:
        plugin.close()
    all_gone(hosts, 5, "a host of the closed guard")


def test_a_rerun_that_does_not_match_is_refused(
    group: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cli_helpers import usage_error

    from p11guard.cli._parts import Manifest

    source, out = records(tmp_path, 50), tmp_path / "sigs"
    out.mkdir()
    plan = make_plan(source, 20)
    Manifest(plan.identity, plan.records, 20, plan.partitions, EC_KEY, "ecdsa-sha256", "ab" * 32).write(out)
    base = [
        "sign",
        "--config",
        str(group.config_path),
        "--key",
        EC_KEY,
        "--in",
        str(source),
        "--out",
        str(out),
        "--dask",
        "tcp://127.0.0.1:9",
        "--quiet",
    ]  # fmt: skip  (refused before any cluster is asked)
    usage_error(capsys, [*base, "--partition-size", "10"], "--partition-size 20, not 10")
    usage_error(capsys, [*base, "--partition-size", "20", "--mechanism", "ecdsa-sha384"], "ecdsa-sha384")
    with source.open("a") as fh:
        fh.write("one more\n")
    usage_error(capsys, [*base, "--partition-size", "20"], "the input changed", "choose another --out")
    plan = make_plan(source, 20)
    Manifest(plan.identity, plan.records, 20, plan.partitions, EC_KEY, "ecdsa-sha256", "ab" * 32).write(out)
    (out / "part-00009.jsonl").write_bytes(b"")
    with pytest.raises(UsageError, match="another run's output"):
        sign_on_cluster(str(group.config_path), EC_KEY, source, out, scheduler="tcp://127.0.0.1:9", partition_size=20)


def test_failed_partitions_write_nothing_exit_1_and_a_rerun_resumes(
    cluster: Cluster, group: Testbed, tmp_path: Path, pubkey: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fail_fast: partitions whose records meet the loss fail whole, are listed, exit 1."""
    from cli_helpers import run

    config = tmp_path / "fail-fast.toml"
    config.write_text(group.config_path.read_text() + '\n[admission]\npolicy = "fail_fast"\n')
    source, out = records(tmp_path, 4_000), tmp_path / "sigs"
    address = cluster.cluster.scheduler_address
    argv = ["sign", "--config", str(config), "--key", EC_KEY, "--in", str(source), "--out", str(out),
            "--dask", address, "--partition-size", "250", "--quiet"]  # fmt: skip
    group.fault("latency", 1)
    code: list[tuple[int, str, str]] = []
    runner = threading.Thread(target=lambda: code.append(run(capsys, argv)), daemon=True)
    runner.start()
    wait_until(lambda: len(parts(out)) >= 2, 60, "2 partitions signed")
    group.fault("lose")
    runner.join(60)
    assert not runner.is_alive()
    status, stdout, _ = code[0]
    done = len(parts(out))
    assert status == 1 and done < 16, stdout
    assert f"{16 - done} failed" in stdout and "250 of its records: batch refused: out of service" in stdout, stdout
    for p in parts(out):  # what was written is whole
        assert len(p.read_bytes().splitlines()) == 250
    group.fault("restore")
    group.fault("latency", 0)
    status, stdout, _ = run(capsys, argv)
    assert status == 0 and f"{done} done before" in stdout, stdout
    verified(source, out, pubkey)


def test_a_directory_in_sorted_partitions_a_record_that_cannot_be_signed_fails_its_own(
    cluster: Cluster, group: Testbed, tmp_path: Path, pubkey: Path
) -> None:
    source, out = tmp_path / "files", tmp_path / "sigs"
    for i in range(30):
        path = source / f"d{i % 3}" / f"f{i:02d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"file %d" % i)
    (source / "a-top").write_bytes(b"top")
    os.mkfifo(source / "d2" / "zz-fifo")  # the last id: partition 4 of 7 records each
    report = sign_on_cluster(str(group.config_path), EC_KEY, source, out, scheduler=cluster.client, quiet=True,
                             partition_size=7)  # fmt: skip
    assert not report.ok and report.signed == 28 and report.failed == 4, report.summary()
    assert report.partitions is not None and [f["k"] for f in report.partitions["failed"]] == [4]
    assert any("zz-fifo" in f["id"] and "FIFO" in f["reason"] for f in report.failures), report.failures
    assert [p.name for p in parts(out)] == [f"part-0000{k}.jsonl" for k in range(4)]
    ids = [json.loads(line)["id"] for p in parts(out) for line in p.read_bytes().splitlines()]
    assert ids == sorted(str(p.relative_to(source)) for p in source.rglob("*") if p.is_file())[:28]
    check = run_verify(source, out, pubkey)
    assert check.valid == 28 and check.shown["missing"] == ["d2/f23", "d2/f26", "d2/f29", "d2/zz-fifo"], check.summary()


def test_a_worker_that_cannot_start_its_guard_stops_the_job_once(
    cluster: Cluster, group: Testbed, tmp_path: Path
) -> None:
    """The PIN file goes away mid-run, then the workers die: their Nannies restart them, their
    guards cannot start, and the job stops with that error once (not once per task)."""
    pin = tmp_path / "copy.pin"
    pin.write_text(group.pin.reveal())
    pin.chmod(0o600)
    source, out = records(tmp_path, 4_000), tmp_path / "sigs"
    group.fault("latency", 1)
    job = Job(config_dict(group, pin_file=str(pin)), EC_KEY, source, out, scheduler=cluster.client, quiet=True,
              partition_size=100)  # fmt: skip
    job.start()
    wait_until(lambda: len(parts(out)) >= 2, 60, "2 partitions signed")
    pin.unlink()
    # Every worker: with one killed, the survivor could sign the rest before Dask gave the
    # restarted worker a task (seen: the job then ended without the error).
    for address in list(cluster.views()):
        cluster.kill_worker(address)
    with pytest.raises(ConfigError, match=r"stopped: a worker cannot sign: group\.pin_file: .*copy\.pin"):
        job.result(60)
    assert len(parts(out)) < 40
    left = cluster.client.run(lambda dask_worker: sorted(dask_worker.plugins))
    assert not [n for names in left.values() for n in names if n.startswith("p11guard")]


def test_usage_errors_of_the_dask_options(group: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli_helpers import usage_error

    source = records(tmp_path, 5)
    base = ["sign", "--config", str(group.config_path), "--key", EC_KEY, "--in", str(source), "--quiet"]
    one_file = [*base, "--out", str(tmp_path / "o.jsonl")]
    usage_error(capsys, [*one_file, "--partition-size", "9"], "--partition-size", "--dask")
    usage_error(capsys, [*base, "--out", str(tmp_path / "d"), "--dask", "local:2", "--timeline", "t.png"], "--timeline")
    usage_error(capsys, [*base, "--out", str(tmp_path / "d"), "--dask", "scheduler:8786"], "tcp://HOST:8786")
    usage_error(capsys, [*base, "--out", str(tmp_path / "d"), "--dask", "local:0"], "between 1 and 64")
    usage_error(capsys, [*base, "--out", str(source), "--dask", "local:2"], "not a directory")
    usage_error(capsys, [*base, "--out", str(tmp_path / "d"), "--dask", "local:2", "--partition-size", "0"],
                "--partition-size must be between 1")  # fmt: skip
    with pytest.raises(UsageError, match="no Dask scheduler answers there"), open_client("tcp://127.0.0.1:9", 1.0):
        pass
    assert not (tmp_path / "d").exists()
    usage_error(capsys, ["merge", str(tmp_path), "--out", str(tmp_path / "m.jsonl")], "manifest.json")
    usage_error(capsys, ["verify", "--in", str(source), "--sigs", str(tmp_path), "--pubkey", str(source)],
                "manifest.json")  # fmt: skip
