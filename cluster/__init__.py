"""The batch signing job on a Dask cluster (``pip install 'p11guard[dask]'``).

One :class:`GuardPlugin` per worker holds that worker's guard; :func:`sign_on_cluster` (and
``p11guard sign --dask``) cuts the input into fixed partitions and signs each exactly once
into a directory of part files, through group losses and dead workers::

    from p11guard.cluster import sign_on_cluster

    report = sign_on_cluster("/etc/p11guard/p11guard.toml", "release-key", "records.txt", "sigs/",
                             scheduler="tcp://scheduler:8786")

The Dask library is imported with absolute imports only (this package is not ``dask``), and
names here are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from p11guard.base import lazy_exports

if TYPE_CHECKING:
    from p11guard.cluster._config import ConfigSource, client_config, worker_config
    from p11guard.cluster._connect import open_client
    from p11guard.cluster._driver import sign_on_cluster
    from p11guard.cluster._plugin import PLUGIN_NAME, GuardPlugin, remove_plugin, worker_plugin
    from p11guard.cluster._task import PartResult, PartSpec, sign_partition, worker_view

__all__ = [
    "PLUGIN_NAME",
    "ConfigSource",
    "GuardPlugin",
    "PartResult",
    "PartSpec",
    "client_config",
    "open_client",
    "remove_plugin",
    "sign_on_cluster",
    "sign_partition",
    "worker_config",
    "worker_plugin",
    "worker_view",
]

_HOMES = {
    "ConfigSource": "_config",
    "client_config": "_config",
    "worker_config": "_config",
    "open_client": "_connect",
    "sign_on_cluster": "_driver",
    "PLUGIN_NAME": "_plugin",
    "GuardPlugin": "_plugin",
    "worker_plugin": "_plugin",
    "remove_plugin": "_plugin",
    "PartResult": "_task",
    "PartSpec": "_task",
    "sign_partition": "_task",
    "worker_view": "_task",
}


__getattr__, __dir__ = lazy_exports(__name__, _HOMES, __all__)
