"""Talking to a member's fault proxy over its control socket (one JSON line each way)."""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

from p11guard.testbed._procs import TestbedError, alive

__all__ = ["member_status", "proxy_control"]


def proxy_control(control_socket: str, msg: dict[str, Any]) -> dict[str, Any]:
    """Send one command to a fault proxy; its reply, or :class:`TestbedError` with its error."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(control_socket)
        sock.sendall(json.dumps(msg).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    if not reply.get("ok"):
        raise TestbedError(str(reply.get("error")))
    return reply


def member_status(member: dict[str, Any]) -> dict[str, Any]:
    """Which of a member's processes run, and its proxy's active fault."""
    proxy_up = alive(member.get("proxy_pid"), member.get("proxy_created"))
    server_up = alive(member.get("server_pid"), member.get("server_created"))
    out: dict[str, Any] = {
        "name": member["name"],
        "address": f"unix:path={member['proxy_socket']}",
        "server": {"pid": member.get("server_pid") if server_up else None, "running": server_up},
        "proxy": {"pid": member.get("proxy_pid") if proxy_up else None, "running": proxy_up},
    }
    if proxy_up:
        with contextlib.suppress(OSError, ValueError, TestbedError):
            reply = proxy_control(member["control_socket"], {"cmd": "status"})
            out["fault"] = {k: v for k, v in reply.items() if k != "ok"}
    return out
