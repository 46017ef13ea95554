"""The ``p11guard`` command line.

Exit codes: 0 success; 1 the work ran but some of it failed; 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence

from p11guard.base import P11GuardError
from p11guard.cli._paths import UsageError

__all__ = ["main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _testbed(opts: argparse.Namespace) -> int:
    from p11guard.testbed import Testbed

    bed = Testbed(opts.dir)
    if opts.action == "up":
        started = bed.up(members=opts.members, backend=opts.backend)
        if not started:
            print(f"a testbed is already running in {bed.dir}", file=sys.stderr)
        print(bed.config_path)
    elif opts.action == "down":
        if not bed.state_path.exists():
            raise UsageError(
                f"no testbed in {bed.dir} (nothing to stop); start one with: p11guard testbed up --dir {opts.dir}"
            )
        bed.down()
        print(f"testbed in {bed.dir} stopped")
    elif opts.action == "status":
        print(json.dumps(bed.status(), indent=2))
    elif opts.action == "fault":
        ms: float | None = None
        if opts.fault == "latency":
            if opts.ms is None:
                raise UsageError("latency needs milliseconds, e.g. `p11guard testbed fault --dir D latency 2`")
            try:
                ms = float(opts.ms)
            except ValueError:
                raise UsageError(f"latency needs a number of milliseconds, not {opts.ms!r}") from None
        elif opts.ms is not None:
            raise UsageError(f"fault {opts.fault!r} takes no argument")
        status = bed.fault(opts.fault, ms, member=opts.member)
        if opts.member is None and len(status.get("members", [])) > 1:
            print(json.dumps({m["name"]: m.get("fault") for m in status["members"]}))
        else:
            print(json.dumps(status.get("fault", status)))
    return EXIT_OK


def _member_count(text: str) -> int:
    from p11guard.testbed import MAX_MEMBERS

    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of members is needed, not {text!r}") from None
    if not 1 <= count <= MAX_MEMBERS:
        raise argparse.ArgumentTypeError(f"members must be between 1 and {MAX_MEMBERS}, not {count}")
    return count


def build_parser() -> argparse.ArgumentParser:
    from p11guard.testbed import BACKENDS, DEVICE_FAULTS, FAULTS, MAX_MEMBERS

    parser = argparse.ArgumentParser(
        prog="p11guard",
        description="Keep PKCS#11 crypto work alive through the loss of a whole HSM group.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log state changes (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tb = sub.add_parser("testbed", help="run a simulated network HSM group (SoftHSM2 + p11-kit)")
    tb_sub = tb.add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (
        ("up", "start it in the background; print the config path"),
        ("down", "stop every process it started"),
        ("status", "which processes run, which fault is active"),
    ):
        p = tb_sub.add_parser(action, help=text)
        p.add_argument("--dir", required=True, help="the testbed's directory")
        if action == "up":
            p.add_argument(
                "--members",
                type=_member_count,
                default=1,
                metavar="N",
                help=f"HA members: N p11-kit servers over one token, each behind its own proxy (1-{MAX_MEMBERS})",
            )
            p.add_argument(
                "--backend",
                choices=BACKENDS,
                default="softhsm",
                help="softhsm: a network group (default); tpm: a software TPM that can be lost; "
                "opencryptoki: its soft token (one device, in-process)",
            )
    faults = [*FAULTS, *(f for f in DEVICE_FAULTS if f not in FAULTS)]
    p = tb_sub.add_parser("fault", help="inject a fault: " + ", ".join(faults))
    p.add_argument("--dir", required=True)
    p.add_argument("--member", metavar="NAME", help="only this member (default: every member, the whole group)")
    p.add_argument("fault", metavar="FAULT", help=" | ".join(faults))
    p.add_argument("ms", nargs="?", help="milliseconds, for latency")
    tb.set_defaults(func=_testbed)

    from p11guard.cli._commands import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    try:
        opts = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    if opts.verbose:
        logging.basicConfig(
            level=logging.DEBUG if opts.verbose > 1 else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
    func: Callable[[argparse.Namespace], int] = opts.func
    try:
        return func(opts)
    except KeyboardInterrupt:
        print("p11guard: interrupted", file=sys.stderr)
        return 130
    except P11GuardError as exc:
        print(f"p11guard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
