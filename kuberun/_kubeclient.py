"""The Kubernetes API client, built from :class:`~kuberun.config.KubernetesConfig`.

kubernetes-asyncio's own loaders do the work (in-cluster service account,
kubeconfig files with every auth method, exec credential plugins); this
module picks the source, turns every failure into a
:class:`~kuberun.errors.ConfigError` naming the config key to fix, and keeps
the bearer token fresh for a gateway that runs for weeks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import yaml
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.config import incluster_config, kube_config

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import KubernetesConfig

__all__ = ["REFRESH_INTERVAL", "make_api_client", "make_client_configuration"]

logger = logging.getLogger("kuberun.config")

#: Seconds between two reloads of kubeconfig credentials (token files,
#: exec plugins, OIDC); the same period the in-cluster loader uses.
REFRESH_INTERVAL = 60.0


class _CredentialRefresher:
    """A ``refresh_api_key_hook`` that reloads kubeconfig credentials.

    kubernetes-asyncio calls the hook before every request that carries a
    bearer token (and :mod:`kuberun.execstream` does the same before each
    upgrade).  Reloading through the loader re-reads ``tokenFile``s and
    re-runs exec plugins whose credential is about to expire; doing it at
    most once per :data:`REFRESH_INTERVAL` keeps the cost off the hot path.
    """

    def __init__(self, loader: Any, *, insecure: bool) -> None:
        self._loader = loader
        self._insecure = insecure
        self._lock = asyncio.Lock()
        self._next = time.monotonic() + REFRESH_INTERVAL

    async def __call__(self, configuration: Configuration) -> None:
        if time.monotonic() < self._next:
            return
        async with self._lock:
            if time.monotonic() < self._next:
                return
            try:
                await self._loader.load_and_set(configuration)
            except Exception as exc:
                # Keep the current credential: it may well still be valid, and
                # the API server's 401 will say so loudly if not.
                logger.warning(
                    "cannot refresh Kubernetes credentials (%s): %s", type(exc).__name__, exc
                )
            finally:
                self._next = time.monotonic() + REFRESH_INTERVAL
            if self._insecure:
                # The loader re-applies the kubeconfig's own TLS setting.
                configuration.verify_ssl = False


def _read_contexts(paths: list[str]) -> tuple[list[str], str | None]:
    """Context names and the current context across kubeconfig files."""
    names: list[str] = []
    current: str | None = None
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError("kubernetes.kubeconfig", f"cannot read {path}: {exc.strerror}")
        except yaml.MarkedYAMLError as exc:
            # Only the position: the default message quotes the offending
            # line, which may hold a token.
            mark = exc.problem_mark
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
            raise ConfigError("kubernetes.kubeconfig", f"{path}: invalid YAML at {where}")
        except (yaml.YAMLError, UnicodeDecodeError):
            raise ConfigError("kubernetes.kubeconfig", f"{path}: not a YAML kubeconfig")
        if not isinstance(data, dict):
            raise ConfigError("kubernetes.kubeconfig", f"{path}: not a kubeconfig (no mapping)")
        for entry in data.get("contexts") or []:
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                names.append(entry["name"])
        if data.get("current-context"):
            # kubernetes-asyncio's merger lets the last file win.
            current = str(data["current-context"])
    return names, current


def _kubeconfig_files(cfg: KubernetesConfig) -> list[str]:
    """The existing kubeconfig files to merge, after checking the context exists."""
    spec = cfg.kubeconfig or os.environ.get("KUBECONFIG") or "~/.kube/config"
    paths = [os.path.expanduser(p) for p in spec.split(os.pathsep) if p]
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
        why = "" if cfg.kubeconfig else " (and KUBERNETES_SERVICE_HOST is unset: not in a cluster)"
        raise ConfigError("kubernetes.kubeconfig", f"no kubeconfig file at {', '.join(paths)}{why}")
    contexts, current = _read_contexts(existing)
    shown = ", ".join(repr(c) for c in contexts) or "none"
    if cfg.context is not None and cfg.context not in contexts:
        raise ConfigError(
            "kubernetes.context",
            f"no context {cfg.context!r} in {', '.join(existing)} (available: {shown})",
        )
    if cfg.context is None and current is None:
        raise ConfigError(
            "kubernetes.context",
            f"{', '.join(existing)} sets no current-context; choose one of: {shown}",
        )
    return existing


async def _load_kubeconfig(cfg: KubernetesConfig, configuration: Configuration) -> None:
    existing = _kubeconfig_files(cfg)
    try:
        loader = await kube_config.load_kube_config(
            config_file=os.pathsep.join(existing),
            context=cfg.context,
            client_configuration=configuration,
            # Never write refreshed tokens back: the file is often a read-only
            # ConfigMap or Secret mount, and it belongs to the operator.
            persist_config=False,
        )
    except Exception as exc:
        raise ConfigError("kubernetes.kubeconfig", f"cannot load {', '.join(existing)}: {exc}")
    configuration.refresh_api_key_hook = _CredentialRefresher(loader, insecure=not cfg.verify_tls)


async def make_client_configuration(cfg: KubernetesConfig) -> Configuration:
    """Build a kubernetes-asyncio ``Configuration`` from ``cfg``.

    The source is, in order: ``cfg.kubeconfig`` (with ``cfg.context``); the
    in-cluster service account when ``KUBERNETES_SERVICE_HOST`` is set and
    neither ``kubeconfig`` nor ``context`` is; ``$KUBECONFIG`` (a
    ``:``-separated list, merged); ``~/.kube/config``.  The bearer token is
    refreshed through ``configuration.refresh_api_key_hook``: call
    ``await configuration.get_api_key_with_prefix("BearerToken")`` for the
    current one.

    :raises ConfigError: with path ``kubernetes.kubeconfig`` (or
        ``kubernetes.context``) when no usable configuration is found.
    """
    configuration = Configuration()
    in_cluster = (
        cfg.kubeconfig is None
        and cfg.context is None
        and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    )
    if in_cluster:
        try:
            incluster_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        except Exception as exc:
            raise ConfigError(
                "kubernetes.kubeconfig",
                f"KUBERNETES_SERVICE_HOST is set but the in-cluster configuration cannot be "
                f"loaded ({exc}); set kubernetes.kubeconfig to use a kubeconfig file instead",
            )
    else:
        await _load_kubeconfig(cfg, configuration)
    if not cfg.verify_tls:
        configuration.verify_ssl = False
        logger.warning(
            "TLS verification of the Kubernetes API server at %s is OFF "
            "(kubernetes.verify_tls: false): anyone on the path can impersonate it",
            configuration.host,
        )
    elif not configuration.verify_ssl:
        logger.warning(
            "TLS verification of the Kubernetes API server at %s is OFF "
            "(insecure-skip-tls-verify in the kubeconfig)",
            configuration.host,
        )
    return configuration


async def make_api_client(cfg: KubernetesConfig) -> ApiClient:
    """Build a kubernetes-asyncio ``ApiClient`` for the cluster ``cfg`` names.

    See :func:`make_client_configuration` for where the configuration comes
    from.  The caller owns the client: ``await client.close()`` when done.

    :raises ConfigError: when no usable configuration is found.
    """
    return ApiClient(configuration=await make_client_configuration(cfg))
