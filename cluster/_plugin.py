"""One Guard per Dask worker: a ``WorkerPlugin``.

``setup`` starts the worker's guard off the event loop; ``teardown`` closes it (and so
its host processes). The plugin carries only where the config is (a path, or the parsed
dict): each worker reads the PIN from ``pin_file``/``pin_env`` on its own machine, so
neither the pickled plugin nor the scheduler ever holds it.

A setup that fails raises: ``Client.register_plugin`` re-raises the first worker's error
once, with its field named. On a worker that joins later (a Nanny restarting a killed
worker), a failed setup is kept and answered by :meth:`GuardPlugin.guard`. A guard that
is FAILED or CLOSED is replaced at its next use.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from distributed import WorkerPlugin, get_worker

from p11guard._guard import Guard
from p11guard.cluster._config import ConfigSource, worker_config

if TYPE_CHECKING:
    from distributed import Client, Worker

__all__ = ["PLUGIN_NAME", "GuardPlugin", "remove_plugin", "worker_plugin"]

PLUGIN_NAME = "p11guard"
_DEAD = ("FAILED", "CLOSED")


class GuardPlugin(WorkerPlugin):
    """A guard on every Dask worker, started in ``setup`` and closed in ``teardown``.

    Args:
        config: an absolute config path, or the parsed config (see
            :func:`p11guard.cluster.client_config`, which checks it in the client).
        name: the plugin's name on the cluster (one guard per name per worker).
    """

    def __init__(self, config: ConfigSource, name: str = PLUGIN_NAME) -> None:
        self.config = config
        self.name = name
        self._guard: Guard | None = None
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._started = 0  #: guards started on this worker
        self._recoveries_before = 0  #: recoveries of the guards replaced
        self._outages_before: list[dict[str, Any]] = []

    def __getstate__(self) -> dict[str, Any]:
        # What travels: where the config is, and the name. Never a guard, a lock, a PIN.
        return {"config": self.config, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["config"], state["name"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"<GuardPlugin {self.name!r} guard={self._guard!r}>"

    # -- Dask's hooks (on the worker's event loop) ----------------------------------------

    async def setup(self, worker: Worker) -> None:
        await asyncio.to_thread(self._start)

    async def teardown(self, worker: Worker) -> None:
        await asyncio.to_thread(self.close)

    # -- for tasks (in the worker's threads) ----------------------------------------------

    def _start(self) -> None:
        with self._lock:
            self._replace()

    def _replace(self) -> Guard:
        old = self._guard
        if old is not None:
            self._recoveries_before += old.recoveries
            try:
                self._outages_before += old.status().get("outages", [])
            except Exception:
                pass
            old.close()
            self._guard = None
        try:
            self._guard = Guard(worker_config(self.config))
        except BaseException as exc:
            self._error = exc
            raise
        self._error = None
        self._started += 1
        return self._guard

    def guard(self) -> Guard:
        """This worker's guard; a FAILED or CLOSED one (or none: a failed setup) is
        replaced now. Raises what starting a guard raised (a :class:`ConfigError` ...)."""
        with self._lock:
            guard = self._guard
            if guard is not None and guard.state not in _DEAD:
                return guard
            return self._replace()

    def close(self) -> None:
        """Close the guard (its hosts stop); idempotent."""
        with self._lock:
            if self._guard is not None:
                self._guard.close()

    def view(self, full: bool = False) -> dict[str, Any]:
        """This worker's guard for the driver's progress line and report: pid, state,
        recoveries, host pids; with ``full``, outages (asks the supervisor)."""
        guard = self._guard
        out: dict[str, Any] = {
            "pid": os.getpid(),
            "time": time.time(),
            "guards_started": self._started,
            "error": None if self._error is None else str(self._error),
        }
        if guard is None:
            return {**out, "state": "NONE", "recoveries": self._recoveries_before, "hosts": {}}
        out.update(
            state=guard.state,
            recoveries=self._recoveries_before + guard.recoveries,
            members=list(guard.members_serving),
            hosts=guard.host_pids() if guard.state != "CLOSED" else {},
        )
        if full:
            try:
                outages = guard.status().get("outages", [])
            except Exception:
                outages = []
            out["outages"] = self._outages_before + outages
        return out


def worker_plugin(name: str = PLUGIN_NAME) -> GuardPlugin:
    """The plugin ``name`` of the worker running this task. Raises ``LookupError`` if it
    is not registered there."""
    plugin = get_worker().plugins.get(name)
    if not isinstance(plugin, GuardPlugin):
        raise LookupError(f"no p11guard plugin {name!r} on this worker: register GuardPlugin first")
    return plugin


async def _remove_here(dask_worker: Worker, name: str) -> None:
    if name in dask_worker.plugins:
        await dask_worker.plugin_remove(name)


def remove_plugin(client: Client, name: str = PLUGIN_NAME) -> None:
    """Take the plugin off the cluster: off the scheduler (no worker that joins gets it)
    and off every worker (its guard closes). A worker that was joining while the scheduler
    dropped it may still have got it: it is asked directly too."""
    try:
        client.unregister_worker_plugin(name)
    except Exception:
        pass  # not registered (any more)
    try:
        client.run(_remove_here, name=name, on_error="ignore")
    except Exception:
        pass  # the cluster is going away
