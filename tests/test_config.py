"""Configuration: safe defaults, and every bad field named at load."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from p11guard import Config, ConfigError

MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "p11guard.toml"
    path.write_text(text)
    return path


BASE = f'[module]\npath = "{MODULE}"\n[group]\ntoken_label = "t"\npin_file = "pin"\n'


def test_defaults_and_relative_pin_file(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("1234\n")
    config = Config.from_file(_write(tmp_path, BASE))
    assert config.pin_file == str(tmp_path / "pin")
    assert config.load_pin().reveal() == "1234"
    assert (config.policy, config.call_s, config.queue_max, config.fault_injection) == (
        "queue",
        20.0,
        10000,
        False,
    )
    assert config.workers >= 1


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ("[workers]\ncount = 0\n", "workers.count", "between 1 and"),
        ('[workers]\ncount = "4"\n', "workers.count", "must be an integer"),
        ("[timeouts]\ncall_s = -1\n", "timeouts.call_s", "> 0"),
        ("[recovery]\nbackoff_initial_s = 5\nbackoff_max_s = 1\n", "recovery.backoff_max_s", ">= recovery"),
        ('[admission]\npolicy = "drop"\n', "admission.policy", "'queue' or 'fail_fast'"),
        ("[admission]\nqueue_maxx = 3\n", "admission.queue_maxx", "unknown field"),
        ("[bogus]\nx = 1\n", "bogus", "unknown section"),
        ("[testing]\nfault_injection = 1\n", "testing.fault_injection", "true or false"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, extra: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_file(_write(tmp_path, BASE + extra))
    assert info.value.field == field and str(info.value).startswith(field)


def test_missing_and_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_file(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        Config.from_file(_write(tmp_path, "[module\n"))
    with pytest.raises(ConfigError, match="module.path: no such file"):
        Config.from_file(_write(tmp_path, BASE.replace(MODULE, "/nope.so")))
    with pytest.raises(ConfigError, match="group.token_label: is required"):
        Config.from_file(_write(tmp_path, f'[module]\npath = "{MODULE}"\n[group]\npin_env = "X"\n'))
    with pytest.raises(ConfigError, match="exactly one of pin_file and pin_env"):
        Config.from_file(_write(tmp_path, BASE + 'pin_env = "X"\n'))
    config = Config.from_file(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match="group.pin_file: cannot read PIN file"):
        config.load_pin()
    env_config = Config.from_file(_write(tmp_path, BASE.replace('pin_file = "pin"', 'pin_env = "P11G_PIN"')))
    monkeypatch.delenv("P11G_PIN", raising=False)
    with pytest.raises(ConfigError, match="group.pin_env: environment variable P11G_PIN is not set"):
        env_config.load_pin()
    monkeypatch.setenv("P11G_PIN", "4321")
    secret = env_config.load_pin()
    assert secret.reveal() == "4321" and "4321" not in repr(secret)


def test_secret_cannot_be_pickled() -> None:
    import pickle

    from p11guard import Secret

    with pytest.raises(TypeError):
        pickle.dumps(Secret("1234"))


MEMBER = '[[group.members]]\nname = "{name}"\nenv = {{ ADDR = "{name}.sock" }}\n'


def test_members_merge_their_env_over_the_module_env(tmp_path: Path) -> None:
    text = BASE.replace(f'path = "{MODULE}"\n', f'path = "{MODULE}"\nenv = {{ ADDR = "x", KEEP = "k" }}\n')
    text += MEMBER.format(name="hsm-a") + MEMBER.format(name="hsm-b") + 'token_label = "other"\n'
    config = Config.from_file(_write(tmp_path, text))
    assert [m.name for m in config.members] == ["hsm-a", "hsm-b"]
    named = dict(config.member_configs())
    assert named["hsm-a"].module_env == {"ADDR": "hsm-a.sock", "KEEP": "k"}
    assert (named["hsm-a"].token_label, named["hsm-b"].token_label) == ("t", "other")
    assert named["hsm-b"].module_path == MODULE and named["hsm-b"].members == ()
    # no members: the group is one member, "default", with the config as it is
    assert Config.from_file(_write(tmp_path, BASE)).member_configs()[0][0] == "default"
    assert "hsm-a.sock" not in repr(config) and "Member('hsm-a')" in repr(config)


@pytest.mark.parametrize(
    ("members", "field", "message"),
    [
        ("[[group.members]]\nenv = {}\n", "group.members[0].name", "is required"),
        (MEMBER.format(name="a") + MEMBER.format(name="a"), "group.members[1].name", "listed twice"),
        (MEMBER.format(name="a b"), "group.members[0].name", "is not a member name"),
        ('[[group.members]]\nname = "a"\nport = 1\n', "group.members[0].port", "unknown field"),
        ('[[group.members]]\nname = "a"\nenv = { X = 1 }\n', "group.members[0].env.X", "must be strings"),
        ('[[group.members]]\nname = "a"\npath = "/nope.so"\n', "group.members[0].path", "no such file"),
        ('[[group.members]]\nname = "a"\ntoken_label = ""\n', "group.members[0].token_label", "must not be empty"),
        ("[[group.members]]\nname = 3\n", "group.members[0].name", "must be a string"),
    ],
)
def test_bad_members_are_named(tmp_path: Path, members: str, field: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_file(_write(tmp_path, BASE + members))
    assert info.value.field == field


def test_members_must_be_tables(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"group\.members: must be a list of tables, not str"):
        Config.from_file(_write(tmp_path, BASE + 'members = "a,b"\n'))


# -- numbers, environment names, new fields ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "field", "message"),
    [
        ("[timeouts]\ncall_s = inf\n", "timeouts.call_s", "finite number of seconds, not inf"),
        ("[timeouts]\nprobe_s = nan\n", "timeouts.probe_s", "finite number of seconds, not nan"),
        ("[timeouts]\ncall_s = 1e300\n", "timeouts.call_s", r"<= 86400 \(1 day\), not 1e\+300"),
        ("[timeouts]\nstart_s = 1" + "0" * 400 + "\n", "timeouts.start_s", "<= 86400"),
        ("[admission]\nop_deadline_s = 86401\n", "admission.op_deadline_s", "<= 86400"),
        ("[recovery]\nbackoff_max_s = -inf\n", "recovery.backoff_max_s", "finite"),
        ("[recovery]\ngive_up_after_s = 0\n", "recovery.give_up_after_s", "> 0"),
        ("[recovery]\ngive_up_after_s = 1e9\n", "recovery.give_up_after_s", r"<= 2\.592e\+06 \(30 days\)"),
        ("[recovery]\ngive_up_after_s = nan\n", "recovery.give_up_after_s", "finite"),
        ('[recovery]\ngive_up_after_s = "10"\n', "recovery.give_up_after_s", "must be a number"),
        ('[module]\nenv = { "A=B" = "x" }\n', "module.env.A=B", "no '=' or NUL"),
        ('[module]\nenv = { "" = "x" }\n', "module.env.''", "needs a name"),
        ('[module]\nenv = { "A\\u0000B" = "x" }\n', "module.env.'A\\x00B'", "no '=' or NUL"),
        ('[module]\nenv = { A = "x\\u0000y" }\n', "module.env.A", "NUL character"),
        ('[[group.members]]\nname = "a"\nenv = { "X=1" = "y" }\n', "group.members[0].env.X=1", "no '=' or NUL"),
        ('[group]\nserials = "123"\n', "group.serials", "must be a list of strings, not str"),
        ('[group]\nserials = [""]\n', "group.serials[0]", "is not a serial number"),
        ('[group]\nserials = [" 12"]\n', "group.serials[0]", "no leading or trailing spaces"),
        ("[group]\nserials = [12]\n", "group.serials[0]", "must be a string"),
        ('[group]\nserials = ["a", "a"]\n', "group.serials[1]", "listed twice"),
    ],
)
def test_bad_numbers_env_and_new_fields_are_named(tmp_path: Path, extra: str, field: str, message: str) -> None:
    # sections given twice are merged by hand: the extra one goes into the base text
    text = BASE
    for section in ("[module]\n", "[group]\n"):
        if extra.startswith(section):
            text = text.replace(section, extra)
            extra = ""
    with pytest.raises(ConfigError, match=message) as info:
        Config.from_file(_write(tmp_path, text + extra))
    assert info.value.field == field and str(info.value).startswith(field)
    assert "\n" not in str(info.value)


def test_env_with_equals_is_refused_by_validate_too(tmp_path: Path) -> None:
    config = Config.from_file(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match=r"^module\.env\.A=B: ") as info:
        config.replace(module_env={"A=B": "x"})
    assert info.value.field == "module.env.A=B"
    with pytest.raises(ConfigError, match=r"^timeouts\.call_s: must be a finite"):
        config.replace(call_s=float("inf"))


def test_new_fields_default_and_load(tmp_path: Path) -> None:
    config = Config.from_file(_write(tmp_path, BASE))
    assert (config.give_up_after_s, config.serials) == (None, ())
    text = BASE.replace("[group]\n", '[group]\nserials = ["A1B2", "C3D4"]\n') + "[recovery]\ngive_up_after_s = 600\n"
    config = Config.from_file(_write(tmp_path, text))
    assert config.give_up_after_s == 600.0 and isinstance(config.give_up_after_s, float)
    assert config.serials == ("A1B2", "C3D4")
    assert dict(config.member_configs())["default"].serials == ("A1B2", "C3D4")


# -- PIN files: regular, small, one newline removed -------------------------------------------------


@pytest.mark.parametrize(
    ("content", "pin"),
    [
        (b"1234\n", "1234"),
        (b"1234\r\n", "1234"),
        (b"1234", "1234"),
        (b" 12 34 \n", " 12 34 "),
        (b"1234\n\n", "1234\n"),
        (b"\t1234 ", "\t1234 "),
    ],
)
def test_pin_file_loses_one_final_newline_only(tmp_path: Path, content: bytes, pin: str) -> None:
    (tmp_path / "pin").write_bytes(content)
    assert Config.from_file(_write(tmp_path, BASE)).load_pin().reveal() == pin


def _pin_config(tmp_path: Path, pin_path: str) -> Config:
    return Config.from_file(_write(tmp_path, BASE.replace('pin_file = "pin"', f'pin_file = "{pin_path}"')))


@pytest.mark.timeout(10)
def test_pin_file_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pin.fifo"
    os.mkfifo(fifo)  # nobody writes it: opening it to read would block for ever
    with pytest.raises(ConfigError, match=r"^group\.pin_file: PIN file .* is a FIFO, not a regular file"):
        _pin_config(tmp_path, str(fifo)).load_pin()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(("path", "kind"), [("/dev/zero", "a character device"), ("DIR", "a directory")])
def test_pin_file_device_or_directory_is_refused(tmp_path: Path, path: str, kind: str) -> None:
    path = str(tmp_path) if path == "DIR" else path
    with pytest.raises(ConfigError, match=rf"^group\.pin_file: PIN file .* is {kind}, not a regular file"):
        _pin_config(tmp_path, path).load_pin()


def test_pin_file_too_large_or_not_text(tmp_path: Path) -> None:
    (tmp_path / "pin").write_bytes(b"1" * 4097)
    config = Config.from_file(_write(tmp_path, BASE))
    with pytest.raises(ConfigError, match=r"^group\.pin_file: PIN file .* is larger than 4096 bytes"):
        config.load_pin()
    (tmp_path / "pin").write_bytes(b"1" * 4095 + b"\n")
    assert len(config.load_pin().reveal()) == 4095
    (tmp_path / "pin").write_bytes(b"\xff\xfe12\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        config.load_pin()
    (tmp_path / "pin").write_bytes(b"\n")
    with pytest.raises(ConfigError, match="group.pin_file: the PIN is empty"):
        config.load_pin()


def test_pin_env_is_used_as_it_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config.from_file(_write(tmp_path, BASE.replace('pin_file = "pin"', 'pin_env = "P11G_PIN"')))
    monkeypatch.setenv("P11G_PIN", " 43 21 \n")
    assert config.load_pin().reveal() == " 43 21 \n"
    monkeypatch.setenv("P11G_PIN", "")
    with pytest.raises(ConfigError, match="group.pin_env: the PIN is empty"):
        config.load_pin()
