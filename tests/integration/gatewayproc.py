"""A gateway in a process of its own, run as ``kuberun serve`` runs it, for tests that
watch it from outside (RSS, SIGTERM, crashes).

Two additions for those tests: the SSH port is printed on stdout (``PORT <n>``)
once the gateway listens, and everything that reaches the event loop's exception
handler is appended to ``--report`` as one JSON object per line (then handled as
usual, i.e. logged).

    python -m tests.integration.gatewayproc --config CONFIG --report FILE [--loop asyncio]
        [--name NAME] [--janitor] [--connection-prefix PREFIX]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import traceback
from typing import Any

from kuberun.cli import setup_logging
from kuberun.config import load_config, make_api_client
from kuberun.gateway import GatewayRunner


def _recorder(path: str) -> Any:
    def record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        entry = {
            "message": str(context.get("message")),
            "exception": repr(exc) if exc is not None else None,
            "traceback": "".join(traceback.format_exception(exc)) if exc is not None else None,
            "context": {k: repr(v)[:500] for k, v in context.items() if k != "exception"},
        }
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        loop.default_exception_handler(context)

    return record


async def serve(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(_recorder(args.report))
    config = load_config(args.config)
    setup_logging(config.logging.format, args.log_level or config.logging.level)
    api_client = await make_api_client(config.kubernetes)
    runner = GatewayRunner(config, api_client, name=args.name)
    if args.connection_prefix:
        runner.gateway._prefix = args.connection_prefix
    try:
        await runner.start()
        # Before the port is announced: a SIGTERM right after it is then a shutdown.
        runner.install_signal_handlers()
        if args.janitor:
            await runner.gateway.janitor.collect_leftovers()
        print(f"PORT {runner.port}", flush=True)
        await runner.wait_stopped()
        await runner.close()
    finally:
        await api_client.close()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="gatewayproc")
    parser.add_argument("--config", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--name", default="chaos")
    parser.add_argument("--log-level", default=None)
    parser.add_argument(
        "--janitor",
        action="store_true",
        help="wait until the Pods a gateway of this name left are deleted (the janitor "
        "of `kuberun serve` owes them at start-up) before printing the port",
    )
    # Connection ids become PREFIX-<pid>-<n>, so a test knows the recording file names.
    parser.add_argument("--connection-prefix", default=None)
    args = parser.parse_args()
    if args.loop == "uvloop":
        import uvloop

        return int(uvloop.run(serve(args)))
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
