"""The gateway-instance id, and the janitor that finds what a run of this gateway left behind.

Every Pod kuberun creates carries ``kuberun.io/gateway`` with the id of the
gateway instance that made it (:func:`gateway_id`). A gateway killed before it
could delete its Pods (SIGKILL, OOM, a node gone) leaves them labelled so; the
:class:`LeftoverJanitor` of its next run, under the same id, lists them and owes their
deletion to the :class:`~kuberun.reaper.Reaper`. It runs at start-up and then
periodically, so Pods whose deletion was lost track of while the gateway runs
(a create whose answer never came, a listing that failed) are found too.

A Pod is left alone while it belongs to a live connection of this gateway, when
it is a user-mode Pod (``pod.mode: user``: shared by every replica, deleted by
its idle clock only), or while ``keep`` says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import KuberunError
from .manifests import (
    LABEL_CONNECTION_ID,
    LABEL_GATEWAY,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    id_label_value,
    managed_selector,
)
from .pods import PodController, PodRef
from .reaper import Reaper
from .workspace import LABEL_MODE

if TYPE_CHECKING:
    from .config import Config

__all__ = ["JANITOR_INTERVAL", "LeftoverJanitor", "gateway_id"]

_log = logging.getLogger("kuberun")

#: Seconds between two janitor rounds of a running gateway.
JANITOR_INTERVAL = 300.0

#: Environment variables that name the gateway instance when the config does
#: not: set explicitly, or the gateway's own Pod name from the downward API.
GATEWAY_ID_ENV = ("KUBERUN_GATEWAY_ID", "KUBERUN_GATEWAY_NAME", "KUBERUN_POD_NAME")

_ephemeral_ids: dict[str, str] = {}


def gateway_id(config: Config) -> str:
    """The id of this gateway instance: the value of ``kubernetes.gateway_id``,
    else the downward API's Pod name (``KUBERUN_POD_NAME``, set in ``deploy/``),
    else the host name and the listen address.

    The default is stable across restarts of the same gateway on the same host
    and address. With port 0 (a free port, chosen anew each run) nothing is
    stable: the id then names this process, so two such gateways on one host
    never take each other's Pods for leftovers.
    """
    if config.kubernetes.gateway_id:
        return config.kubernetes.gateway_id
    for name in GATEWAY_ID_ENV:
        value = os.environ.get(name)
        if value:
            return id_label_value(value)
    host, port = config.ssh.listen_address
    base = f"{socket.gethostname()}-{host}-{port}"
    if port == 0:
        key = base
        if key not in _ephemeral_ids:
            _ephemeral_ids[key] = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        base = _ephemeral_ids[key]
    return id_label_value(base)


class LeftoverJanitor:
    """Finds Pods of this gateway instance that nothing owns and owes their deletion.

    :param live: the connection ids of the gateway's open connections
    :param keep: optional; True for a Pod that must stay although no live
        connection owns it
    :param list_timeout: seconds one listing may take, retries included
    """

    def __init__(
        self,
        controller: PodController,
        reaper: Reaper,
        namespace: str,
        gateway: str,
        *,
        live: Callable[[], set[str]],
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
        list_timeout: float = 30.0,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
    ) -> None:
        self._controller = controller
        self._reaper = reaper
        self._namespace = namespace
        self._gateway = id_label_value(gateway)
        self._live = live
        self._keep = keep
        self._list_timeout = list_timeout
        self._logger = logger or _log
        self._failing = False
        self._task: asyncio.Task[None] | None = None

    async def sweep(self, timeout: float | None = None) -> list[PodRef]:
        """One round: owe the deletion of every leftover; returns them.

        :raises KuberunError: if the Pods cannot be listed within ``timeout``
            (default ``list_timeout``)
        """
        deadline = time.monotonic() + (timeout if timeout is not None else self._list_timeout)
        selector = managed_selector(gateway=self._gateway)
        pods = await self._controller.list_pods(self._namespace, selector, deadline)
        live = {id_label_value(i) for i in self._live()}
        found = []
        for pod in pods:
            meta = pod.get("metadata") or {}
            labels = meta.get("labels") or {}
            # The selector already says so; a second look costs nothing and guards
            # against an API server that ignores label selectors.
            if labels.get(LABEL_GATEWAY) != self._gateway:
                continue
            if labels.get(LABEL_MANAGED_BY) != MANAGED_BY or not meta.get("uid"):
                continue
            if meta.get("deletionTimestamp") or labels.get(LABEL_CONNECTION_ID) in live:
                continue
            if labels.get(LABEL_MODE) == "user":
                continue  # shared by every replica: only the idle clock deletes it
            if self._keep is not None and self._keep(pod):
                continue
            ref = PodRef(self._namespace, str(meta.get("name") or ""), str(meta["uid"]))
            if self._reaper.owes(ref):
                continue
            self._logger.info("janitor: deleting leftover Pod %s", ref.name)
            self._reaper.owe(ref)
            found.append(ref)
        return found

    def start(self, interval: float = JANITOR_INTERVAL) -> asyncio.Task[None]:
        """Run :meth:`sweep` every ``interval`` seconds (the first round at once)."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run(interval))
        return self._task

    async def stop(self) -> None:
        """Stop the periodic rounds."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self, interval: float) -> None:
        while True:
            await self.round()
            await asyncio.sleep(interval)

    async def round(self, timeout: float | None = None) -> bool:
        """:meth:`sweep`, with a failure logged (once while it lasts); True if it listed."""
        try:
            await self.sweep(timeout)
        except KuberunError as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            self._failing = True
            self._logger.log(level, "janitor could not list this gateway's Pods: %s", exc)
            return False
        if self._failing:
            self._failing = False
            self._logger.info("janitor: listing Pods works again")
        return True
