"""``p11guard status``: what an operator sees, and the exit code a script checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import run, usage_error

from p11guard.testbed import Testbed


def test_status_of_a_serving_group(capsys: pytest.CaptureFixture[str], group: Testbed) -> None:
    code, out, _ = run(capsys, ["status", "--config", str(group.config_path), "--json"])
    assert code == 0
    report = json.loads(out)
    assert report["serving"] is True and report["health"]["state"] == "SERVING"
    member = report["status"]["members"][0]
    serial = member["last_probe"]["serial"]
    assert serial and member["last_probe"]["token_label"] == group.token_label
    assert [w["status"] for w in report["status"]["workers"]] == ["idle"]  # a one-off guard: one worker

    code, out, _ = run(capsys, ["status", "--config", str(group.config_path)])
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f'HA group "{group.token_label}": SERVING, generation 0')
    header = next(line for line in lines if line.split()[:3] == ["member", "state", "gen"])
    row = lines[lines.index(header) + 1].split()
    assert row[:4] == ["default", "serving", "0", serial]
    assert "outages: none" in out and "counters: ops_ok" in out


def test_status_of_a_lost_group_exits_1(capsys: pytest.CaptureFixture[str], group: Testbed) -> None:
    group.fault("lose")
    code, out, _ = run(capsys, ["status", "--config", str(group.config_path)])
    assert code == 1
    assert "(not serving)" in out.splitlines()[0] and "CKR_DEVICE_ERROR" in out
    code, out, _ = run(capsys, ["status", "--config", str(group.config_path), "--json"])
    assert code == 1
    report = json.loads(out)
    assert report["serving"] is False and "CKR_DEVICE_ERROR" in report["health"]["reason"]


def test_status_usage_errors_exit_2(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("P11GUARD_CONFIG", raising=False)
    usage_error(capsys, ["status"], "--config")
    usage_error(capsys, ["status", "--config", str(tmp_path / "missing.toml")], "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[module]\n")
    usage_error(capsys, ["status", "--config", str(bad)], "module.path")
    no_pin = tmp_path / "no-pin.toml"
    no_pin.write_text(f'[module]\npath = "{bad}"\n[group]\ntoken_label = "t"\npin_file = "{tmp_path}/none"\n')
    usage_error(capsys, ["status", "--config", str(no_pin)], "pin_file")


@pytest.mark.hsm_members(3)
def test_status_of_a_group_with_a_member_lost(capsys: pytest.CaptureFixture[str], hsm_group: Testbed) -> None:
    hsm_group.fault("lose", member="hsm-b")
    code, out, _ = run(capsys, ["status", "--config", str(hsm_group.config_path)])
    assert code == 0  # the group serves on the others
    assert "2 of 3 members serving" in out.splitlines()[0]
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("  hsm-")}
    assert rows["hsm-a"][1] == "serving" and rows["hsm-c"][1] == "serving"
    assert rows["hsm-b"][1] == "lost"
    assert "hsm-b: probe of hsm-b failed" in out and "CKR_DEVICE_ERROR" in out
