"""An HA group of 3 members (3 p11-kit servers over one token, each behind its own fault
proxy), under load from 8 threads: lose some members without stopping, lose all and recover."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from conftest import EC_KEY, Load, guard, progress_after, wait_until
from p11guard import Config, Guard, Member
from p11guard.cli import main
from p11guard.testbed import Testbed, find_tools

pytestmark = pytest.mark.hsm_members(3)

A, B, C = "hsm-a", "hsm-b", "hsm-c"


@pytest.fixture
def ha(hsm_group: Testbed) -> Testbed:
    """The 3-member testbed, with the test key (made once; the members share the token)."""
    hsm_group.ensure_keys({EC_KEY: "ec-p256"})
    return hsm_group


def ha_config(bed: Testbed, **changes: Any) -> Config:
    """2 workers per member; short timeouts."""
    return bed.client_config(**{"workers": 6, "backoff_max_s": 0.5, "op_deadline_s": 60.0, **changes})


def member(g: Guard, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in g.status()["members"] if m["name"] == name)
    return found


def serving(g: Guard, *names: str) -> bool:
    return all(member(g, n)["state"] == "serving" for n in names)


@contextmanager
def ha_guard(config: Config) -> Iterator[Guard]:
    with guard(config) as g:
        wait_until(lambda: serving(g, A, B, C), 15, "every member serving")
        yield g


def lose(bed: Testbed, g: Guard, name: str) -> None:
    bed.fault("lose", member=name)
    wait_until(lambda: member(g, name)["state"] == "lost", 10, f"{name} lost")


def test_config_lists_the_members(ha: Testbed) -> None:
    config = ha_config(ha)
    assert [m.name for m in config.members] == [A, B, C]
    named = dict(config.member_configs())
    assert named[B].module_env["P11_KIT_SERVER_ADDRESS"] == f"unix:path={ha.member_proxy_socket(B)}"
    with ha_guard(config) as g:
        status = g.status()
        # workers are spread over the members, 2 each, each host on its member's server
        assert [len(m["workers"]) for m in status["members"]] == [2, 2, 2]
        by_member = {m["name"]: set(m["workers"]) for m in status["members"]}
        assert all(w["id"] in by_member[w["member"]] for w in status["workers"])
        assert set(g.host_pids()) >= {"probe-hsm-a", "probe-hsm-b", "probe-hsm-c"}


def test_lose_one_member_no_op_fails_and_it_comes_back(ha: Testbed) -> None:
    config = ha_config(ha)
    with ha_guard(config) as g, Load(g) as load:
        pem = g.public_key(EC_KEY)
        lose(ha, g, B)
        status = g.status()
        assert status["state"] == "SERVING" and status["generation"] == 0
        assert member(g, B)["workers"] == [] and member(g, B)["reason"]
        progress_after(load, 200)  # a and c carry the load
        # an outage of a few re-probes, not a blip (its spare hosts have booted)
        failed = g.status()["counters"]["probes_failed"]
        wait_until(lambda: g.status()["counters"]["probes_failed"] >= failed + 3, 10, "b re-probed")
        restored = time.time()
        ha.fault("restore", member=B)
        wait_until(lambda: serving(g, B), 10, "b serving again")
        # the bound: the member's workers serve within backoff_max_s + 0.5 s (the
        # outage ends when its first worker is ready; wall clock on both sides)
        b = member(g, B)
        back = b["outages"][0]["end"]
        assert back - restored <= config.backoff_max_s + 0.5, b
        wait_until(lambda: any(w["ops"] for w in g.status()["workers"] if w["member"] == B), 10, "b's first op")
        status = g.status()
    assert load.errors == []
    load.verify_all(pem)
    assert status["generation"] == 0 and status["counters"]["recoveries"] == 0
    b = next(m for m in status["members"] if m["name"] == B)
    assert b["losses"] == 1 and b["recoveries"] == 1 and b["generation"] == 1
    assert len(b["outages"]) == 1 and b["outages"][0]["duration_s"] > 0


def test_hang_one_member_in_flight_calls_are_retried_elsewhere(ha: Testbed) -> None:
    config = ha_config(ha, call_s=1.0, probe_s=0.5)
    with ha_guard(config) as g, Load(g) as load:
        pem = g.public_key(EC_KEY)
        retried = g.status()["counters"]["ops_retried"]
        ha.fault("hang", member=A)
        wait_until(lambda: member(g, A)["state"] == "lost", 10, "a lost")
        progress_after(load, 200)
        status = g.status()
        assert status["state"] == "SERVING" and status["generation"] == 0
        assert status["counters"]["ops_retried"] > retried  # the calls caught in the hang
        ha.fault("restore", member=A)
        wait_until(lambda: serving(g, A), 10, "a serving again")
        progress_after(load)
    assert load.errors == []
    load.verify_all(pem)


def test_lose_every_member_one_after_another_recovers_once(ha: Testbed) -> None:
    with ha_guard(ha_config(ha)) as g, Load(g) as load:
        pem = g.public_key(EC_KEY)
        lose(ha, g, A)
        lose(ha, g, B)
        progress_after(load)  # c alone carries it
        assert g.state == "SERVING" and g.generation == 0
        ha.fault("lose", member=C)
        wait_until(lambda: g.state == "RECOVERING", 10, "the group lost")
        assert g.generation == 1
        ha.fault("restore")
        wait_until(lambda: g.state == "SERVING" and serving(g, A, B, C), 15, "everything serving")
        progress_after(load)
        status = g.status()
    assert load.errors == []
    load.verify_all(pem)
    assert status["generation"] == 1 and status["counters"]["recoveries"] == 1
    assert len(status["outages"]) == 1 and all(w["generation"] == 1 for w in status["workers"])


def test_a_flapping_member_never_triggers_a_group_recovery(ha: Testbed) -> None:
    with ha_guard(ha_config(ha)) as g, Load(g) as load:
        pem = g.public_key(EC_KEY)
        for i in range(4):
            wait_until(lambda: serving(g, C), 15, "c serving")
            ha.fault("lose", member=C)
            if i % 2 == 0:  # sometimes long enough to be noticed, sometimes a blip
                wait_until(lambda: member(g, C)["state"] == "lost", 10, "c lost")
            else:
                progress_after(load, 20)
            ha.fault("restore", member=C)
            progress_after(load, 20)
        wait_until(lambda: serving(g, A, B, C), 15, "c serving again")
        progress_after(load)
        status = g.status()
    assert load.errors == []
    load.verify_all(pem)
    assert status["generation"] == 0 and status["counters"]["recoveries"] == 0 and status["outages"] == []
    assert status["counters"]["member_losses"] >= 2


def test_a_key_made_while_a_member_is_lost_works_through_it_when_back(ha: Testbed) -> None:
    label = f"ha-new-{secrets.token_hex(3)}"
    with ha_guard(ha_config(ha)) as g:
        lose(ha, g, B)
        g.generate_key_pair(label, "ec-p256")  # through a or c
        pub = load_pem_public_key(g.public_key(label))
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        ha.fault("restore", member=B)
        wait_until(lambda: serving(g, B), 10, "b serving again")
        # only b left: the signature can only come from b's workers
        lose(ha, g, A)
        lose(ha, g, C)
        b_ops = sum(w["ops"] for w in g.status()["workers"] if w["member"] == B)
        try:
            sig = g.sign(label, b"made while b was away")
            pub.verify(sig, b"made while b was away", ec.ECDSA(hashes.SHA256()))
            assert sum(w["ops"] for w in g.status()["workers"] if w["member"] == B) == b_ops + 1
            assert g.generation == 0
        finally:
            ha.fault("restore")
            wait_until(lambda: serving(g, A, C), 10, "a and c serving again")
            g.destroy(label)


def test_members_without_the_label_or_the_pin_are_kept_out(ha: Testbed, tmp_path: Path) -> None:
    # A fourth "member" that answers without our token label, and a fifth whose token
    # (another SoftHSM2 store, same label) has another PIN.
    other = Testbed(tmp_path / "other", token_label=ha.token_label)
    other.make_token()
    config = ha_config(ha)
    a_env = dict(config.members[0].env)
    config = config.replace(
        workers=5,
        members=(
            *config.members,
            Member("wrong-label", a_env, token_label="nope"),
            Member("wrong-pin", {"SOFTHSM2_CONF": str(other.softhsm_conf)}, path=find_tools()["softhsm"]),
        ),
    )
    with guard(config) as g:
        wait_until(lambda: serving(g, A, B, C), 15, "the three good members serving")
        wait_until(
            lambda: member(g, "wrong-label")["state"] == member(g, "wrong-pin")["state"] == "out", 10, "two kept out"
        )
        assert "no token labelled 'nope'" in member(g, "wrong-label")["reason"]
        assert "CKR_PIN_INCORRECT" in member(g, "wrong-pin")["reason"]
        pem = g.public_key(EC_KEY)
        sig = g.sign(EC_KEY, b"still serving")
        pub = load_pem_public_key(pem)
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        pub.verify(sig, b"still serving", ec.ECDSA(hashes.SHA256()))
        # the group lost and back: the PIN is never tried again on the member that refused it
        ha.fault("lose")
        wait_until(lambda: g.state == "RECOVERING", 10, "group lost")
        ha.fault("restore")
        wait_until(lambda: g.state == "SERVING" and serving(g, A, B, C), 15, "group back")
        status = g.status()
    assert status["counters"]["login_failures"] == 1
    assert {m["name"]: m["state"] for m in status["members"]}["wrong-pin"] == "out"
    assert all(w["member"] in (A, B, C) for w in status["workers"])


def test_testbed_faults_name_their_member(ha: Testbed) -> None:
    assert ha.members == [A, B, C]
    status = ha.fault("latency", 3, member=C)
    assert [m["fault"]["latency_ms"] for m in status["members"]] == [0, 0, 3]
    ha.fault("kill-server", member=A)
    running = {m["name"]: m["server"]["running"] for m in ha.status()["members"]}
    assert running == {A: False, B: True, C: True}
    ha.fault("start-server", member=A)
    assert all(m["server"]["running"] for m in ha.status()["members"])
    with pytest.raises(Exception, match="no member 'hsm-z' in this testbed; its members: hsm-a, hsm-b, hsm-c"):
        ha.fault("lose", member="hsm-z")


def test_sign_cli_rides_through_a_member_loss(ha: Testbed, tmp_path: Path) -> None:
    n = 10_000  # ~4 s: the loss must land while the job runs
    source, out, report = tmp_path / "records.txt", tmp_path / "sigs.jsonl", tmp_path / "r.json"
    source.write_text("".join(f"record number {i}\n" for i in range(1, n + 1)))
    pub = tmp_path / "pub.pem"
    assert main(["pubkey", "--config", str(ha.config_path), "--key", EC_KEY, "--out", str(pub)]) == 0
    cmd = [sys.executable, "-m", "p11guard", "sign", "--config", str(ha.config_path), "--key", EC_KEY]
    cmd += ["--in", str(source), "--out", str(out), "--report", str(report)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    all_serve = threading.Event()

    def read_progress() -> None:  # the job may start before its third member serves: wait for it
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "SERVING (3/3 members)" in line:
                all_serve.set()

    reader = threading.Thread(target=read_progress, daemon=True)
    reader.start()
    try:
        assert all_serve.wait(60), "".join(lines)
        ha.fault("lose", member=A)
        assert proc.wait(120) == 0, "".join(lines)
        reader.join(10)
    finally:
        proc.kill()
        proc.wait(10)
        ha.fault("restore", member=A)
    progress = "".join(lines)
    data = json.loads(report.read_text())
    assert data["signed"] == n and data["failed"] == 0 and data["recoveries"] == 0
    # plain progress lines on a pipe, one at each change of the state or the members serving
    assert "SERVING (3/3 members)" in progress and "SERVING (2/3 members)" in progress
    assert main(["verify", "--in", str(source), "--sigs", str(out), "--pubkey", str(pub)]) == 0


def test_each_member_reports_the_mechanisms_it_negotiated(ha: Testbed) -> None:
    with ha_guard(ha_config(ha)) as g:
        tables = g.mechanisms()
        status = g.status()
    assert sorted(tables) == [A, B, C]
    for m in status["members"]:  # the choice made is in status() per member too
        assert m["mechanisms"]["ecdsa-sha256"]["via"] == "CKM_ECDSA"
    for name in (A, B, C):  # p11-kit's client lists SoftHSM2's mechanisms: raw ECDSA, hashed in the host
        entry = tables[name]["mechanisms"]["ecdsa-sha256"]
        assert (entry["via"], entry["hash"]) == ("CKM_ECDSA", "host")
        assert tables[name]["token"]["label"] == ha.token_label
