"""Recovery by evidence on a real device loss of another implementation: tpm2-pkcs11 on a
software TPM (swtpm behind tpm2-abrmd). A killed TPM answers CKR_GENERAL_ERROR (0x5) --
not a classic loss code -- sticky until the module is re-initialised; C_Initialize fails
while it is down; a stopped one blocks every call."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator

import pytest

from conftest import EC_KEY, Load, guard, progress_after, wait_until
from p11guard import Config, OutOfService
from p11guard.testbed import Testbed

pytestmark = pytest.mark.hsm_backend("tpm")


@pytest.fixture
def tpm(hsm_group: Testbed) -> Iterator[Testbed]:
    hsm_group.ensure_keys({EC_KEY: "ec-p256"})
    yield hsm_group


def _config(bed: Testbed, **changes: object) -> Config:
    return bed.client_config(**{"workers": 2, "op_deadline_s": 60.0, **changes})


def test_device_killed_for_3s_under_load_nothing_fails(
    tpm: Testbed, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    with guard(_config(tpm)) as g, Load(g, threads=4) as load:
        pem = g.public_key(EC_KEY)
        tpm.fault("kill-device")
        wait_until(lambda: g.state in ("LOST", "RECOVERING"), 15, "the loss noticed by evidence")
        timer = threading.Timer(3.0, tpm.fault, ("start-device",))
        timer.start()
        try:
            wait_until(lambda: g.state == "SERVING" and g.generation == 1, 30, "recovery")
        finally:
            timer.join()
        progress_after(load)
        status = g.status()
    assert load.errors == []
    load.verify_all(pem)
    assert status["counters"]["recoveries"] == 1 and status["state"] == "SERVING"
    assert "CKR_GENERAL_ERROR" in status["outages"][0]["cause"]
    module_lines = [r for r in caplog.records if r.name == "p11guard.host"]
    assert "ESYS" not in capfd.readouterr().err  # the module's own logging never reaches the terminal
    assert module_lines, "the module's output went to the p11guard.host logger"


def test_fail_fast_answers_only_out_of_service_during_the_outage(tpm: Testbed) -> None:
    with guard(_config(tpm, policy="fail_fast")) as g, Load(g, threads=4) as load:
        tpm.fault("kill-device")
        wait_until(lambda: g.state in ("LOST", "RECOVERING"), 15, "the loss")
        wait_until(lambda: any(isinstance(e, OutOfService) for e in load.errors), 10, "a refusal")
        tpm.fault("start-device")
        wait_until(lambda: g.state == "SERVING" and g.generation == 1, 30, "recovery")
        progress_after(load)
    kinds = collections.Counter(type(e).__name__ for e in load.errors)
    assert set(kinds) == {"OutOfService"}, kinds


def test_hung_device_is_a_loss_and_recovers(tpm: Testbed) -> None:
    with guard(_config(tpm, call_s=1.0)) as g, Load(g, threads=2) as load:
        tpm.fault("hang-device")
        wait_until(lambda: g.state in ("LOST", "RECOVERING"), 15, "the hang noticed")
        tpm.fault("start-device")  # SIGCONT
        wait_until(lambda: g.state == "SERVING" and g.generation >= 1, 30, "recovery")
        progress_after(load)
    assert load.errors == []


def test_flapping_device_converges_one_recovery_at_a_time(tpm: Testbed) -> None:
    with guard(_config(tpm)) as g, Load(g, threads=2) as load:
        for _ in range(3):
            tpm.fault("kill-device")
            wait_until(lambda: g.state != "SERVING", 15, "the loss")
            tpm.fault("start-device")
        wait_until(lambda: g.state == "SERVING", 30, "serving again")
        progress_after(load)
        status = g.status()
    assert load.errors == []
    assert status["generation"] == status["counters"]["recoveries"] >= 1


def test_chaos_on_the_tpm_backend_holds_every_invariant() -> None:
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "p11guard", "chaos", "--backend", "tpm", "--duration", "14", "--seed", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["violations"] == [], (result["violations"], done.stderr[-2000:])
    assert result["backend"] == "tpm" and result["recoveries"] >= 1 and result["ops"] > 100
