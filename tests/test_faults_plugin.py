"""The fault-injection products: the pytest plugin (from outside the package) and chaos."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from p11guard.testing._chaos import OpRecord, check, make_schedule

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example_test_hsm_outage.py"


def test_plugin_fixtures_from_a_project_outside(pytester: pytest.Pytester) -> None:
    # The example the docs tell users to copy, run as a user's own test file.
    pytester.makepyfile(test_user=EXAMPLE.read_text())
    pytester.makepyfile(
        test_faults="""
        from p11guard.base import poll_until

        def _key(guard):
            if "plugin-key" not in {k["label"] for k in guard.list_keys()}:
                guard.generate_key_pair("plugin-key", "ec-p256")

        def test_per_host_faults(guard, hsm_faults):
            _key(guard)
            before = guard.host_pids()
            killed = hsm_faults.kill_host(worker=1)
            assert killed == [before["worker-1"]]
            poll_until(  # replaced, unasked
                lambda: guard.host_pids().get("worker-1") not in (None, killed[0]), 10, "worker-1 replaced"
            )
            hsm_faults.fail_next(0xB3, count=1, ops=["sign"], worker=0)
            hsm_faults.hang_host(0.2, worker=1)
            sigs = guard.sign_many("plugin-key", [b"%d" % i for i in range(50)])
            assert len(sigs) == 50
            assert guard.status()["generation"] == 0

        def test_group_faults(guard, hsm_faults, hsm_group):
            _key(guard)
            hsm_faults.latency(1)
            assert hsm_group.status()["fault"]["latency_ms"] == 1.0
            hsm_faults.latency(0)
            hsm_faults.hang()
            assert hsm_group.status()["fault"]["mode"] == "hung"
            hsm_faults.restore()
            assert guard.sign("plugin-key", b"x")
    """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=120", "-q")
    result.assert_outcomes(passed=5)


def test_schedule_is_reproducible() -> None:
    a, b = make_schedule(7, 60), make_schedule(7, 60)
    assert a == b and len(a) >= 5
    assert make_schedule(8, 60) != a
    assert all(f.at_s < 60 for f in a)
    assert all(later.at_s > earlier.at_s + earlier.seconds for earlier, later in itertools.pairwise(a))


def _good_records(pem_and_sig: tuple[bytes, bytes, bytes]) -> list[OpRecord]:
    _, data, sig = pem_and_sig
    return [
        OpRecord(1, "sign", "ok", check={"data": data.hex(), "signature": sig.hex()}),
        OpRecord(2, "encrypt_decrypt", "ok", check={"plain": "00ff", "decrypted": "00ff"}),
        OpRecord(3, "generate_key_pair", "error", error="OutcomeUnknown: outcome unknown: ..."),
        OpRecord(4, "verify", "ok", check={"valid": True}),
    ]


@pytest.fixture(scope="module")
def signed() -> tuple[bytes, bytes, bytes]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, b"data", key.sign(b"data", ec.ECDSA(hashes.SHA256()))


STATUS = {"generation": 2, "counters": {"recoveries": 2}}


def test_checker_accepts_a_clean_record(signed: tuple[bytes, bytes, bytes]) -> None:
    assert check(_good_records(signed), STATUS, signed[0], [], 0, "SERVING") == []


@pytest.mark.parametrize(
    ("corrupt", "expected"),
    [
        (lambda r: r[0].check.update(signature="00" * 70), "signature does not verify"),
        (lambda r: r[1].check.update(decrypted="0000"), "did not decrypt"),
        (lambda r: setattr(r[0], "completions", 2), "completed 2 times"),
        (lambda r: r.append(OpRecord(1, "random", "ok")), "recorded twice"),
        (lambda r: r.append(OpRecord(9, "sign", "error", error="OutcomeUnknown: x")), "idempotent"),
        (lambda r: r.append(OpRecord(9, "random", "error", error="OpTimeout: late")), "failed: OpTimeout"),
        (
            lambda r: r.append(OpRecord(9, "random", "error", error="StaleGeneration: stale_generation")),
            "stale generation",
        ),
    ],
)
def test_checker_catches_corruption(signed: tuple[bytes, bytes, bytes], corrupt, expected: str) -> None:
    records = _good_records(signed)
    corrupt(records)
    violations = check(records, STATUS, signed[0], [], 0, "SERVING")
    assert any(expected in v for v in violations), violations


def test_checker_catches_run_level_faults(signed: tuple[bytes, bytes, bytes]) -> None:
    records = _good_records(signed)
    assert (
        "generation 3 != recoveries 2"
        in check(records, {"generation": 3, "counters": {"recoveries": 2}}, signed[0], [], 0, "SERVING")[0]
    )
    assert "processes left behind" in check(records, STATUS, signed[0], [4242], 0, "SERVING")[0]
    assert "file descriptors grew" in check(records, STATUS, signed[0], [], 20, "SERVING")[0]
    assert "final state RECOVERING" in check(records, STATUS, signed[0], [], 0, "RECOVERING")[0]


@pytest.mark.parametrize("seed", [1, 2])
def test_short_chaos_run(seed: int) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "p11guard", "chaos", "--duration", "14", "--seed", str(seed), "--json"],
        capture_output=True,
        text=True,
        timeout=170,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["violations"] == [] and result["ok"] is True, done.stderr[-3000:]
    assert done.returncode == 0
    assert result["faults"] == len(make_schedule(seed, 14)) and result["ops"] > 100
    assert result["recoveries"] == result["generation"]


def test_the_checker_keeps_counts_not_records() -> None:
    from p11guard.testing._checker import MAX_VIOLATIONS, Checker

    checker = Checker(None)
    for seq in range(200_000):
        checker.add(OpRecord(seq, "random", "ok"))
    for seq in range(200_000, 200_100):
        checker.add(OpRecord(seq, "random", "error", error="GuardFailed: x"))
    checker.add(OpRecord(5, "random", "ok"))  # the same operation twice
    assert checker.ops == 200_101 and checker.errors == 100
    assert len(checker.violations) == MAX_VIOLATIONS and checker.more_violations == 51
    assert len(checker._seen) < 30_000  # a bit per operation, not a record
    assert checker.finish({"generation": 0, "counters": {"recoveries": 0}}, [], 0, "SERVING")[-1].startswith("...")


def test_the_soak_slope_tells_growth_from_noise(tmp_path: Path) -> None:
    import random

    from p11guard.testing._soak import TOLERANCE_MIB_PER_MIN, growth, soak_verdict

    rng = random.Random(3)
    flat = [{"t": t, "supervisor_mib": 60 + rng.uniform(-2, 2)} for t in range(600)]
    leak = [{"t": t, "supervisor_mib": 60 + 0.5 * t / 60 + rng.uniform(-2, 2)} for t in range(600)]
    assert abs(growth(flat)) < TOLERANCE_MIB_PER_MIN
    assert abs(growth(leak) - 0.5) < 0.1
    problems, report = soak_verdict(leak, tmp_path, lambda text: None)
    assert problems and "MiB/min" in problems[0] and report["slope_mib_per_min"] > 0.4
    assert soak_verdict(flat, tmp_path, lambda text: None)[0] == []
