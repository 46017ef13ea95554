"""Configuration: safe defaults, and every bad field named at load."""

from __future__ import annotations

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
