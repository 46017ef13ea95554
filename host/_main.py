"""Entry point of a host process: ``python -m p11guard.host --fd N --parent PID``.

The parent passes one end of a socket pair (``--fd``) and its pid. The first frame is
``hello`` (module path, generation, fault injection, frame limit); then requests, one at a
time, until ``close``, EOF on the pipe, or the parent's death.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from p11guard.host._dispatch import Host
from p11guard.protocol import MAX_FRAME, Channel, FrameError, decode, encode

_PR_SET_PDEATHSIG = 1
# Exit codes a parent can tell apart from a crash.
EXIT_OK = 0
EXIT_POISONED = 3
EXIT_ORPHANED = 4


def _die_with_parent(parent: int) -> None:
    # The kernel kills us when the parent (thread) dies -- even inside a hung module call.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(EXIT_ORPHANED)


def _parse_argv(argv: list[str]) -> tuple[int, int]:
    # Our own two options, given by HostProcess: argparse would cost the host start-up time.
    opts = dict(zip(argv[::2], argv[1::2], strict=False))
    try:
        return int(opts["--fd"]), int(opts["--parent"])
    except (KeyError, ValueError):
        sys.exit("usage: python -m p11guard.host --fd N --parent PID (started by p11guard, not by hand)")


def main(argv: list[str] | None = None) -> int:
    """Serve requests on the inherited pipe until told to stop."""
    fd, parent = _parse_argv(sys.argv[1:] if argv is None else argv)
    # Ctrl-C in a terminal reaches the whole process group; the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    conn = Channel(fd)
    max_frame = MAX_FRAME
    host: Host | None = None
    while True:
        try:
            data = conn.recv(max_frame)
        except (EOFError, OSError, FrameError):
            # EOF: the parent closed the pipe or died. FrameError: oversized frame (poison).
            return EXIT_OK if host is None or not host.serving else EXIT_POISONED
        try:
            request = decode(data)
        except FrameError:
            conn.close()
            return EXIT_POISONED
        if host is None:
            reply, host, max_frame = _hello(request, max_frame)
        else:
            reply = host.handle(request)
        try:
            frame = encode(reply, max_frame)
        except FrameError as exc:
            err = {"kind": "user", "ckr": None, "name": "frame_too_large", "message": f"reply {exc}"}
            frame = encode({"id": reply.get("id"), "err": err})
        conn.send(frame)
        if host is not None and request.get("op") == "close" and "ok" in reply:
            conn.close()
            return EXIT_OK


def _hello(request: dict[str, Any], max_frame: int) -> tuple[dict[str, Any], Host | None, int]:
    rid = request.get("id")
    args = request.get("args")
    if request.get("op") != "hello" or not isinstance(args, dict):
        err = Host.error_reply(ValueError("first frame must be 'hello'"))
        return {"id": rid, "err": err}, None, max_frame
    host = Host(generation=int(args["generation"]), fault_injection=bool(args.get("fault_injection")))
    limit = int(args.get("max_frame", max_frame))
    try:
        host.load(str(args["module"]))
    except Exception as exc:
        err = Host.error_reply(exc)
        if err["ckr"] is None:
            # The library could not be opened at all (dlopen, C_GetFunctionList): a
            # configuration error, whenever it happens.
            err["kind"], err["name"] = "config", "module_load_failed"
            err["message"] = f"cannot load PKCS#11 module {args['module']!r}: {exc}"
        else:
            # C_Initialize answered a code: the module is there, its device may not be
            # (a network HSM or a TPM that is down). The supervisor weighs it by when it
            # happens: at first start a configuration error, after serving a loss.
            err["message"] = f"C_Initialize of PKCS#11 module {args['module']!r} failed: {err['message']}"
        return {"id": rid, "err": err}, None, limit
    return {"id": rid, "ok": {"pid": os.getpid(), "generation": host.generation}}, host, limit


if __name__ == "__main__":
    sys.exit(main())
