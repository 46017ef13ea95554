"""Copy this file into your project's tests: p11guard's pytest plugin provides the fixtures.

pip install p11guard        # plus the Debian packages softhsm2 p11-kit p11-kit-modules
pytest test_hsm_outage.py
"""

import time

import pytest

from p11guard import Config, Guard, OutOfService

KEY = "example-key"


def _ensure_key(g: Guard) -> None:
    if KEY not in {k["label"] for k in g.list_keys()}:
        g.generate_key_pair(KEY, "ec-p256")


def _poll(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def test_my_code_keeps_signing_through_a_3_second_total_outage(guard, hsm_faults):
    _ensure_key(guard)
    records = [b"record %d" % i for i in range(200)]
    with hsm_faults.outage(3):  # the whole group is gone for 3 seconds
        signatures = guard.sign_many(KEY, records)  # waits through it, then completes
    assert len(signatures) == len(records)
    assert all(guard.verify(KEY, r, s) for r, s in zip(records, signatures, strict=True))
    assert guard.status()["counters"]["recoveries"] == 1


def test_my_service_answers_503_while_the_group_is_lost(hsm_group, hsm_faults):
    config = Config.from_file(hsm_group.config_path).replace(
        policy="fail_fast", workers=1, probe_s=1.0, backoff_max_s=0.5
    )
    with Guard(config) as g:
        _ensure_key(g)

        def handle(payload: bytes) -> int:  # your request handler
            try:
                g.sign(KEY, payload)
                return 200
            except OutOfService:
                return 503

        assert handle(b"before") == 200
        hsm_faults.lose()
        _poll(lambda: handle(b"during") == 503)
        hsm_faults.restore()
        _poll(lambda: handle(b"after") == 200)


@pytest.mark.hsm_members(2)  # an HA group of two members: hsm-a and hsm-b
def test_losing_one_member_of_two_goes_unnoticed(guard, hsm_faults):
    _ensure_key(guard)

    def member_state(name: str) -> str:
        return next(m["state"] for m in guard.status()["members"] if m["name"] == name)

    records = [b"record %d" % i for i in range(100)]
    hsm_faults.lose(member="hsm-a")
    signatures = guard.sign_many(KEY, records)  # hsm-b carries it
    _poll(lambda: member_state("hsm-a") == "lost")
    hsm_faults.restore(member="hsm-a")
    _poll(lambda: member_state("hsm-a") == "serving")  # back by itself
    assert all(guard.verify(KEY, r, s) for r, s in zip(records, signatures, strict=True))
    assert guard.status()["generation"] == 0  # the group never stopped
