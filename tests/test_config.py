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
