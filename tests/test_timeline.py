"""`p11guard sign --timeline`: a picture of the run, from what was recorded during it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import records_file, sign_args, usage_error

from conftest import EC_KEY, wait_until
from p11guard.cli import _timeline, main
from p11guard.testbed import Testbed

PNG = b"\x89PNG\r\n\x1a\n"


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_timeline_of_a_quiet_run(bed: Testbed, tmp_path: Path) -> None:
    source, out, report, png = (
        records_file(tmp_path, 400),
        tmp_path / "s.jsonl",
        tmp_path / "r.json",
        tmp_path / "t.png",
    )
    assert main(sign_args(bed, source, out, "--report", str(report), "--timeline", str(png))) == 0
    assert png.read_bytes().startswith(PNG)
    timeline = json.loads(report.read_text())["timeline"]
    assert sum(timeline["signatures_per_s"]) == 400
    assert timeline["states"][0][1] == "SERVING" and len(timeline["states"]) == 1
    assert [state for _, state in timeline["members"]["default"]] == ["serving"]


def test_timeline_of_an_outage(group: Testbed, tmp_path: Path) -> None:
    n = 3000
    source, out, report, png = records_file(tmp_path, n), tmp_path / "s.jsonl", tmp_path / "r.json", tmp_path / "t.png"
    args = ["sign", "--config", str(group.config_path), "--key", EC_KEY, "--in", str(source), "--out", str(out)]
    args += ["--quiet", "--report", str(report), "--timeline", str(png)]
    proc = subprocess.Popen([sys.executable, "-m", "p11guard", *args])
    try:
        wait_until(lambda: _lines(out) >= n // 4, 60, "a quarter signed")
        refused = group.fault("lose")["fault"]["refused"]
        wait_until(lambda: group.status()["fault"]["refused"] > refused, 30, "recovery probes")
        group.fault("restore")
        assert proc.wait(120) == 0
    finally:
        proc.kill()
        proc.wait(10)
    assert png.read_bytes().startswith(PNG)
    timeline = json.loads(report.read_text())["timeline"]
    assert sum(timeline["signatures_per_s"]) == n
    states = [state for _, state in timeline["states"]]
    assert states[0] == "SERVING" and states[-1] == "SERVING" and "RECOVERING" in states
    assert "lost" in [state for _, state in timeline["members"]["default"]]
    times = [t for t, _ in timeline["states"]]
    assert times == sorted(times) and times[-1] <= timeline["duration_s"]


def test_timeline_without_matplotlib_is_a_usage_error(
    bed: Testbed, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = _timeline.importlib.util.find_spec
    monkeypatch.setattr(
        _timeline.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name)
    )
    source, out = records_file(tmp_path, 3), tmp_path / "s.jsonl"
    usage_error(capsys, sign_args(bed, source, out, "--timeline", str(tmp_path / "t.png")), "pip install matplotlib")
    assert not out.exists()  # nothing signed, nothing written
