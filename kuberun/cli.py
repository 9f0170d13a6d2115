"""The ``kuberun`` command: ``serve``, ``demo``, ``devcluster``, ``check``."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

from . import __version__
from .config import Config, config_from_dict, load_config, make_api_client
from .errors import ConfigError, KubernetesAPIError

__all__ = ["main"]

_log = logging.getLogger("kuberun")


class JSONFormatter(logging.Formatter):
    """One JSON object per line, with the connection id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        connection_id = getattr(record, "connection_id", None)
        if connection_id:
            entry["connection_id"] = connection_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # asyncssh logs every packet-level event at INFO; keep it for warnings.
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


def run_async(coro: Coroutine[Any, Any, int]) -> int:
    """Run on uvloop when it is installed, else on asyncio."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return int(uvloop.run(coro))


# -- serve ------------------------------------------------------------------


async def _serve(config: Config) -> int:
    from .gateway import GatewayRunner
    from .janitor import PodOwnership, gateway_id, gateway_pod

    api_client = await make_api_client(config.kubernetes)
    try:
        # The janitor (started with the gateway) collects what this gateway leaves.
        ownership = PodOwnership(config, gateway_pod())
        runner = GatewayRunner(
            ownership.config, api_client, ownership=ownership, name=gateway_id(config)
        )
        await runner.run()
    finally:
        await api_client.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"kuberun: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    setup_logging("json" if args.log_json else config.logging.format, config.logging.level)
    try:
        return run_async(_serve(config))
    except ConfigError as exc:
        print(f"kuberun: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"kuberun: {exc}", file=sys.stderr)
        return 1


# -- check ------------------------------------------------------------------


async def _check(config: Config) -> int:
    from .manifests import build_pod
    from .preflight import check_serving

    for warning in check_serving(config):
        print(f"kuberun: warning: {warning}", file=sys.stderr)

    api_client = await make_api_client(config.kubernetes)
    try:
        from kubernetes_asyncio import client as k8s

        manifest = build_pod(config.pod, connection_id="check", username="check")
        api = k8s.CoreV1Api(api_client)
        try:
            await api.create_namespaced_pod(
                config.kubernetes.namespace,
                cast(Any, manifest),
                dry_run="All",
                field_validation="Strict",
            )
        except k8s.ApiException as exc:
            from .pods import api_error

            err = api_error(exc)
            print(f"kuberun: pod template rejected by the cluster: {err}", file=sys.stderr)
            return 1
        except Exception as exc:
            print(f"kuberun: cannot reach the cluster: {exc}", file=sys.stderr)
            return 1
    finally:
        await api_client.close()
    print("config OK; the cluster accepts the pod template (dry run)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"kuberun: invalid config {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        return run_async(_check(config))
    except (ConfigError, KubernetesAPIError) as exc:
        print(f"kuberun: {exc}", file=sys.stderr)
        return 2


# -- demo -------------------------------------------------------------------


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kuberun"


async def _demo(args: argparse.Namespace) -> int:
    from .devcluster import DevCluster
    from .gateway import GatewayRunner

    host = args.listen.rpartition(":")[0].strip("[]")
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    async with DevCluster() as cluster:
        kubeconfig = Path(args.kubeconfig) if args.kubeconfig else state / "kubeconfig"
        cluster.write_kubeconfig(str(kubeconfig))
        sftp = "/usr/lib/openssh/sftp-server"
        keys = Path.home() / ".ssh" / "authorized_keys"
        config = config_from_dict(
            {
                "ssh": {
                    "listen": args.listen,
                    "host_keys": [str(state / "ssh_host_ed25519_key")],
                    "authorized_keys": str(keys) if keys.exists() else None,
                    "accept_env": ["LANG", "LC_*"],
                },
                "kubernetes": {"kubeconfig": str(kubeconfig), "context": "devcluster"},
                "pod": {"subsystems": {"sftp": [sftp]}},
                "metrics": {"listen": args.metrics},
            }
        )
        api_client = await make_api_client(config.kubernetes)
        password = secrets.token_urlsafe(12)
        runner = GatewayRunner(config, api_client, password=password, name="demo")
        try:
            await runner.start()
            runner.install_signal_handlers()
            user = getpass.getuser()
            port_opt = "" if runner.port == 22 else f"-p {runner.port} "
            print(
                "kuberun demo is running: every SSH login gets its own Pod.\n"
                f"  ssh {port_opt}-o StrictHostKeyChecking=no "
                f"-o UserKnownHostsFile=/dev/null {user}@{host or '127.0.0.1'}\n"
                f"  one-time password: {password}\n"
                "  (keys in ~/.ssh/authorized_keys work too)\n"
                f"  kubectl: KUBECONFIG={kubeconfig} kubectl get pods\n"
                "Press Ctrl-C to stop; every Pod is deleted.",
                flush=True,
            )
            await runner.wait_stopped()
        finally:
            await runner.close()
            await api_client.close()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    setup_logging("text", "WARNING" if not args.verbose else "INFO")
    try:
        return run_async(_demo(args))
    except OSError as exc:
        print(f"kuberun: {exc}", file=sys.stderr)
        return 1


# -- devcluster -------------------------------------------------------------


def cmd_devcluster(args: argparse.Namespace) -> int:
    from .devcluster.__main__ import run

    setup_logging("text", "INFO")
    return run_async(run(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kuberun", description="Give every SSH user their own Kubernetes Pod."
    )
    parser.add_argument("--version", action="version", version=f"kuberun {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    serve = sub.add_parser("serve", help="run the SSH gateway", description="Run the SSH gateway.")
    serve.add_argument("--config", required=True, metavar="PATH", help="gateway config (YAML)")
    serve.add_argument("--log-json", action="store_true", help="log one JSON object per line")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="run a local cluster and a gateway, nothing to configure",
        description="Run devcluster and a gateway in one process; print the ssh command.",
    )
    demo.add_argument("--listen", default="127.0.0.1:2222", metavar="HOST:PORT")
    demo.add_argument("--kubeconfig", metavar="PATH", help="write the cluster's kubeconfig here")
    demo.add_argument("--metrics", default=None, metavar="HOST:PORT", help="serve /metrics")
    demo.add_argument("--verbose", action="store_true", help="log at INFO")
    demo.set_defaults(func=cmd_demo)

    from .devcluster.__main__ import add_arguments

    devc = sub.add_parser(
        "devcluster",
        help="run the local Kubernetes API server (not a production runtime)",
        description="Run devcluster: a local Kubernetes API server whose Pods are processes.",
    )
    add_arguments(devc)
    devc.set_defaults(func=cmd_devcluster)

    check = sub.add_parser(
        "check",
        help="validate a config and dry-run its Pod template",
        description="Validate the config and dry-run the Pod template against the cluster.",
    )
    check.add_argument("--config", required=True, metavar="PATH")
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
