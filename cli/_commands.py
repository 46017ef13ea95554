"""The HSM commands of the CLI: keys, keygen, status, pubkey, sign (also on Dask), verify, merge, chaos."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from p11guard.base import Config
from p11guard.cli._paths import UsageError, check_output
from p11guard.protocol import KEY_TYPES, SECRET_TYPES, mechanisms_for

__all__ = ["add_commands"]

EXIT_OK, EXIT_FAILED = 0, 1


def _config(opts: argparse.Namespace, workers: int | None = None) -> Config:
    path = opts.config or os.environ.get("P11GUARD_CONFIG")
    if not path:
        raise UsageError("no config: give --config FILE (or set P11GUARD_CONFIG)")
    config = Config.from_file(path)
    return config.replace(workers=workers) if workers else config


def _keys(opts: argparse.Namespace) -> int:
    from p11guard._guard import Guard

    with Guard(_config(opts, workers=1)) as g:
        keys = g.list_keys()
    if not keys:
        print("no keys on the token")
    width = max([len(k["label"]) for k in keys] + [5])
    for k in keys:
        print(f"{k['label']:<{width}}  {k['type']:<12}  {', '.join(sorted(k['classes']))}")
    return EXIT_OK


def _keygen(opts: argparse.Namespace) -> int:
    from p11guard._guard import Guard

    if opts.type not in KEY_TYPES + SECRET_TYPES:
        raise UsageError(f"--type {opts.type!r}: unknown; known: {', '.join(KEY_TYPES + SECRET_TYPES)}")
    with Guard(_config(opts, workers=1)) as g:
        existing = {k["label"]: k for k in g.list_keys()}
        if opts.label in existing:
            have = existing[opts.label]["type"]
            if not opts.exist_ok:
                raise UsageError(f"--label {opts.label!r} already exists ({have}); use --exist-ok to accept it")
            if have != opts.type:
                raise UsageError(f"--label {opts.label!r} exists with type {have}, not {opts.type}")
            print(f"{opts.label} exists ({have}); nothing to do")
            return EXIT_OK
        if opts.type in SECRET_TYPES:
            g.generate_secret(opts.label, opts.type)
        else:
            g.generate_key_pair(opts.label, opts.type)
    print(f"{opts.label} generated ({opts.type})")
    return EXIT_OK


def _pubkey(opts: argparse.Namespace) -> int:
    from p11guard._guard import Guard
    from p11guard.cli._keyinfo import resolve_key

    if opts.out:
        check_output(Path(opts.out), "--out")
    with Guard(_config(opts, workers=1)) as g:
        resolve_key(g, opts.key, None)
        pem = g.public_key(opts.key)
    if opts.out:
        Path(opts.out).write_bytes(pem)
    else:
        sys.stdout.write(pem.decode())
    return EXIT_OK


def _sign(opts: argparse.Namespace) -> int:
    if opts.dask is not None:
        return _sign_dask(opts)
    for flag, given in (("--partition-size", opts.partition_size is not None), ("--shared-out", opts.shared_out)):
        if given:
            raise UsageError(f"{flag} is for the Dask job: add --dask tcp://HOST:8786 or --dask local:N")
    from p11guard.cli._signjob import run_sign

    report = run_sign(
        _config(opts),
        opts.key,
        Path(opts.input),
        Path(opts.out),
        opts.mechanism,
        Path(opts.report) if opts.report else None,
        opts.quiet,
        resign_changed=opts.resign_changed,
        timeline_path=Path(opts.timeline) if opts.timeline else None,
        digest=opts.digest,
    )
    print(report.summary())
    if report.stopped:
        print(f"p11guard: {report.stopped}", file=sys.stderr)
    if report.changed:
        print(report.changed_line(), file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_FAILED


def _sign_dask(opts: argparse.Namespace) -> int:
    for flag, given in (("--resign-changed", opts.resign_changed), ("--timeline", opts.timeline)):
        if given:
            raise UsageError(f"{flag} is not available with --dask; sign without --dask for it")
    path = opts.config or os.environ.get("P11GUARD_CONFIG")
    if not path:
        raise UsageError("no config: give --config FILE (or set P11GUARD_CONFIG)")
    try:
        from p11guard.cluster import sign_on_cluster  # the layer beside the CLI, reached on demand
    except ImportError as exc:
        raise UsageError(f"--dask needs Dask ({exc.name} is missing): pip install 'p11guard[dask]'") from None

    report = sign_on_cluster(
        path,
        opts.key,
        opts.input,
        opts.out,
        scheduler=opts.dask,
        mechanism=opts.mechanism,
        partition_size=2000 if opts.partition_size is None else opts.partition_size,
        shared_out=opts.shared_out,
        report_path=opts.report,
        quiet=opts.quiet,
    )
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def _merge(opts: argparse.Namespace) -> int:
    from p11guard.cli._parts import merge_parts

    out = Path(opts.out)
    check_output(out, "--out", replaced=True)
    merged, missing = merge_parts(Path(opts.dir), out)
    print(f"merged {merged} part(s) into {out}")
    if missing:
        more = f" ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        print(f"missing partitions: {', '.join(map(str, missing[:20]))}{more} (re-run sign --dask to finish them)")
        return EXIT_FAILED
    return EXIT_OK


def _verify(opts: argparse.Namespace) -> int:
    from p11guard.cli._verify import MAX_JOBS, default_jobs, run_verify

    jobs = default_jobs()
    if opts.jobs is not None:
        try:
            jobs = int(opts.jobs)
        except ValueError:
            jobs = 0
        if not 1 <= jobs <= MAX_JOBS:
            raise UsageError(f"--jobs {opts.jobs!r}: give a number of processes from 1 to {MAX_JOBS}")
    report_path = Path(opts.report) if opts.report else None
    report = run_verify(Path(opts.input), Path(opts.sigs), Path(opts.pubkey), jobs, report_path)
    print(report.summary())
    return EXIT_OK if report.ok else EXIT_FAILED


def _status(opts: argparse.Namespace) -> int:
    from p11guard.cli._status import run_status

    return run_status(_config(opts), opts.json)


def _chaos(opts: argparse.Namespace) -> int:
    from p11guard.testing._chaos import run_cli

    if opts.duration < 5:
        raise UsageError("--duration must be at least 5 seconds")
    return run_cli(opts.duration, opts.seed, opts.json, opts.soak, opts.backend)


def add_commands(sub: Any) -> None:
    """Register the HSM commands on the CLI's sub-parser set."""

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", help="the TOML config (default: $P11GUARD_CONFIG)")
        return p

    p = with_config(sub.add_parser("keys", help="list key labels and types on the token"))
    p.set_defaults(func=_keys)

    p = with_config(sub.add_parser("keygen", help="generate a key pair or a secret key"))
    p.add_argument("--label", required=True)
    p.add_argument("--type", required=True, help=" | ".join(KEY_TYPES + SECRET_TYPES))
    p.add_argument("--exist-ok", action="store_true", help="an existing label of that type is fine")
    p.set_defaults(func=_keygen)

    p = with_config(
        sub.add_parser(
            "status",
            help="start a one-off guard and show the group (like LunaHAStatus); exit 0 if it serves, 1 if not",
        )
    )
    p.add_argument("--json", action="store_true", help="print health and status as JSON")
    p.set_defaults(func=_status)

    p = with_config(sub.add_parser("pubkey", help="print a public key as PEM"))
    p.add_argument("--key", required=True, help="its label, or a PKCS#11 URI")
    p.add_argument("--out", help="write the PEM here instead of stdout")
    p.set_defaults(func=_pubkey)

    p = with_config(
        sub.add_parser(
            "sign",
            help="sign every record of a directory or file, resumably",
            description="Each regular file below a directory, or each line of a file, is a record. "
            "Re-running with the same --out skips what is signed already and unchanged; records "
            "changed since they were signed are reported (exit 1) unless --resign-changed.",
        )
    )
    p.add_argument("--key", required=True, help="the signing key: its label, or a PKCS#11 URI (pkcs11:object=...)")
    p.add_argument("--in", dest="input", required=True, metavar="PATH", help="directory or file")
    p.add_argument(
        "--out",
        required=True,
        metavar="OUT.jsonl",
        help="signatures, one JSON object per line (with --dask: a directory of part files)",
    )
    p.add_argument(
        "--dask",
        metavar="ADDRESS",
        help="run on a Dask cluster: its scheduler (tcp://HOST:8786), or local:N worker processes here",
    )
    p.add_argument(
        "--partition-size",
        type=int,
        metavar="N",
        help="with --dask: records per partition, one part file each (default 2000; fixed for an --out)",
    )
    p.add_argument(
        "--shared-out",
        action="store_true",
        help="with --dask: workers read --in and write --out themselves (both on storage every worker sees)",
    )
    p.add_argument("--mechanism", help="default from the key type: " + ", ".join(mechanisms_for("sign")))
    p.add_argument(
        "--digest",
        action="store_true",
        help="each record is a hex digest (sha256sum's first word) of the mechanism's hash: sign it as such",
    )
    p.add_argument("--report", metavar="R.json", help="write the summary as JSON")
    p.add_argument(
        "--timeline",
        metavar="T.png",
        help="draw signatures per second with the group's and members' states (needs matplotlib)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--resign-changed",
        action="store_true",
        help="sign records changed since --out signed them again (a new line that replaces the old)",
    )
    p.set_defaults(func=_sign)

    p = sub.add_parser(
        "chaos",
        help="seeded fault schedule against a mixed workload on its own testbed; checks invariants",
    )
    p.add_argument("--duration", type=float, default=30.0, help="seconds (default 30)")
    p.add_argument("--seed", type=int, default=1, help="the same seed gives the same schedule")
    p.add_argument("--json", action="store_true", help="one JSON object on the last line")
    p.add_argument("--soak", action="store_true", help="record RSS each second; fail if it keeps growing")
    p.add_argument(
        "--backend",
        choices=("softhsm", "tpm"),
        default="softhsm",
        help="softhsm: the network group (default); tpm: a software TPM that is really lost",
    )
    p.set_defaults(func=_chaos)

    p = sub.add_parser("verify", help="check a signature file with no HSM (cryptography only)")
    p.add_argument("--in", dest="input", required=True, metavar="PATH")
    p.add_argument("--sigs", required=True, metavar="OUT.jsonl", help="a signature file, or a directory of part files")
    p.add_argument("--pubkey", required=True, metavar="pub.pem")
    p.add_argument(
        "--jobs", metavar="N", help="processes that check signatures (default: one per core; 1: this process only)"
    )
    p.add_argument("--report", metavar="R.json", help="write every finding (all ids of each kind) as JSON")
    p.set_defaults(func=_verify)

    p = sub.add_parser("merge", help="write the part files of a `sign --dask` directory as one JSONL, in record order")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--out", required=True, metavar="OUT.jsonl")
    p.set_defaults(func=_merge)
