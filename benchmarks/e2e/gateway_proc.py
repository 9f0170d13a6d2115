"""One kuberun gateway in its own process (so ``/proc/PID/stat`` measures it alone).

``python -m benchmarks.e2e.gateway_proc --kubeconfig K --workdir D --relay cython``

``--relay`` picks the exec stream: ``cython`` and ``python`` are kuberun's own
(the relay module swapped the way the integration tests swap it); ``aiohttp``
replaces :meth:`kuberun.execstream.ExecConnector.open` in this process with the
benchmark-only baseline of :mod:`benchmarks.e2e.aiohttp_stream`. Prints one JSON
line (``{"port": ..., "pid": ...}``) once it accepts connections, then runs until
SIGTERM/SIGINT, deleting its Pods on the way out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kuberun import execstream
from kuberun.cli import run_async, setup_logging
from kuberun.config import config_from_dict, make_api_client
from kuberun.gateway import GatewayRunner

__all__ = ["gateway_config_dict", "main"]


def gateway_config_dict(kubeconfig: str, workdir: str, ping_interval: float) -> dict[str, Any]:
    """The gateway configuration every variant uses (only the exec stream differs)."""
    return {
        "ssh": {
            "listen": "127.0.0.1:0",
            "host_keys": [str(Path(workdir) / "host_key")],
            "authorized_keys": str(Path(workdir) / "authorized_keys"),
            "max_sessions": 10,
        },
        "kubernetes": {
            "kubeconfig": kubeconfig,
            "context": "devcluster",
            "ping_interval": ping_interval,
        },
        "timeouts": {"pod_start": 120, "pod_stop": 60, "command_start": 60},
        "metrics": {"listen": None},
    }


def select_relay(name: str) -> None:
    if name == "cython":
        from kuberun import _relay

        # execstream binds ``relay`` by ``from . import relay`` without re-exporting it.
        execstream.relay = _relay  # type: ignore[attr-defined]
    elif name == "python":
        from kuberun import _relay_py

        execstream.relay = _relay_py  # type: ignore[attr-defined]
    elif name == "aiohttp":
        from . import aiohttp_stream

        aiohttp_stream.install()
    else:
        raise SystemExit(f"unknown relay {name!r}")


async def serve(args: argparse.Namespace) -> int:
    data = gateway_config_dict(args.kubeconfig, args.workdir, args.ping_interval)
    if args.audit_dir:
        data["audit"] = {"directory": args.audit_dir, "recordings": args.recordings}
    config = config_from_dict(data)
    api_client = await make_api_client(config.kubernetes)
    runner = GatewayRunner(config, api_client, name=f"bench-{args.relay}")
    await runner.start()
    runner.install_signal_handlers()
    loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
    print(
        json.dumps({"port": runner.port, "pid": os.getpid(), "relay": args.relay, "loop": loop}),
        flush=True,
    )
    try:
        await runner.wait_stopped()
    finally:
        await runner.close()
        await api_client.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True, help="holds host_key and authorized_keys")
    parser.add_argument("--relay", choices=("cython", "python", "aiohttp"), default="cython")
    parser.add_argument("--ping-interval", type=float, default=30.0)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--audit-dir", default=None, help="audit.directory (default: no audit)")
    parser.add_argument("--recordings", default="pty", help="audit.recordings")
    args = parser.parse_args(argv)
    setup_logging("text", args.log_level)
    logging.getLogger("kuberun").setLevel(args.log_level)
    select_relay(args.relay)
    return run_async(serve(args))


if __name__ == "__main__":
    sys.exit(main())
