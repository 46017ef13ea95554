"""The client configs a testbed writes: through the proxies (network) and in-process (direct)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["write_client_configs"]


def write_client_configs(directory: Path, tools: dict[str, str], state: dict[str, Any], token_label: str) -> None:
    """``p11guard.toml`` (p11-kit client through each member's proxy) and ``direct.toml``
    (SoftHSM2 in-process), with the testbed's short timeouts and fault injection on."""
    pin_path = directory / "user.pin"
    common = (
        f'[group]\ntoken_label = "{token_label}"\npin_file = "{pin_path}"\n\n'
        "[timeouts]\nprobe_interval_s = 1.0\n\n"
        "[recovery]\nbackoff_initial_s = 0.05\nbackoff_max_s = 0.5\n\n"
        "[testing]\nfault_injection = true\n"
    )
    members = state["members"]
    if len(members) == 1:
        network = (
            "# Written by `p11guard testbed up`: the simulated network HSM group.\n"
            f'[module]\npath = "{tools["client"]}"\n'
            f'env = {{ P11_KIT_SERVER_ADDRESS = "unix:path={members[0]["proxy_socket"]}" }}\n\n' + common
        )
    else:
        network = (
            f"# Written by `p11guard testbed up --members {len(members)}`: the simulated network HSM group.\n"
            f'[module]\npath = "{tools["client"]}"\n\n'
            + common
            + "".join(
                f'\n[[group.members]]\nname = "{m["name"]}"\n'
                f'env = {{ P11_KIT_SERVER_ADDRESS = "unix:path={m["proxy_socket"]}" }}\n'
                for m in members
            )
        )
    (directory / "p11guard.toml").write_text(network)
    (directory / "direct.toml").write_text(
        "# Written by `p11guard testbed up`: SoftHSM2 loaded in-process, no network.\n"
        f'[module]\npath = "{tools["softhsm"]}"\n'
        f'env = {{ SOFTHSM2_CONF = "{(directory / "softhsm2.conf")}" }}\n\n' + common
    )
