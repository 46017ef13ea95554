"""The cluster a job runs on: ``local:N`` (started here, stopped at the end), a scheduler
address (``tcp://host:8786``), or a :class:`distributed.Client` you already hold."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from p11guard.cli._paths import UsageError

__all__ = ["MAX_LOCAL_WORKERS", "local_cluster", "open_client"]

MAX_LOCAL_WORKERS = 64
_LOCAL = re.compile(r"local:([0-9]{1,4})")


def local_cluster(workers: int) -> LocalCluster:
    """A cluster of ``workers`` processes on this machine, each under a Nanny that restarts
    it if it dies; they exit when this process does (Dask closes their pipe), and their
    hosts with them."""
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        scheduler_port=0,
        dashboard_address="127.0.0.1:0",  # never 8787: another cluster may have it
        silence_logs=logging.CRITICAL,
    )


@contextmanager
def open_client(scheduler: str | Client, connect_s: float = 10.0) -> Iterator[Client]:
    """A client on ``scheduler``; what this opened is closed at the end.

    Raises:
        UsageError: not ``local:N`` nor an address, or no scheduler answers there.
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    match = _LOCAL.fullmatch(scheduler)
    if match is not None:
        count = int(match.group(1))
        if not 1 <= count <= MAX_LOCAL_WORKERS:
            raise UsageError(f"--dask {scheduler}: between 1 and {MAX_LOCAL_WORKERS} local workers, not {count}")
        cluster = local_cluster(count)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()
        return
    if "://" not in scheduler:
        raise UsageError(f"--dask {scheduler!r}: give a scheduler address (tcp://HOST:8786) or local:N")
    try:
        client = Client(scheduler, timeout=connect_s)
    except (OSError, TimeoutError) as exc:
        raise UsageError(
            f"--dask {scheduler}: no Dask scheduler answers there ({exc}); start one with `dask scheduler` "
            "and workers with `dask worker ADDRESS`"
        ) from None
    try:
        yield client
    finally:
        client.close()
