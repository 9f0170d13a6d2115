"""``python -m kuberun.devcluster`` / ``kuberun devcluster``: run devcluster until SIGINT/SIGTERM.

devcluster is a test double, not a production runtime: Pods are local processes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from .cluster import DevCluster

__all__ = ["add_arguments", "main", "parse_listen", "run"]


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT``, ``HOST`` or ``:PORT`` → (host, port); port 0 = free port."""
    value = value.strip()
    host, port = value, "0"
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise argparse.ArgumentTypeError(f"bad address {value!r}")
        host = value[1:end]
        rest = value[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise argparse.ArgumentTypeError(f"bad address {value!r}")
            port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad port in {value!r}") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range in {value!r}")
    return host or "127.0.0.1", number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add devcluster's options to ``parser`` (used by ``kuberun devcluster`` too)."""
    parser.add_argument(
        "--listen",
        type=parse_listen,
        default=("127.0.0.1", 0),
        metavar="HOST:PORT",
        help="address to listen on (default 127.0.0.1 and a free port)",
    )
    parser.add_argument(
        "--kubeconfig",
        metavar="PATH",
        help="write a kubeconfig for the cluster here once it accepts requests",
    )
    parser.add_argument("--token", help="bearer token clients must present (default: random)")
    parser.add_argument(
        "--workdir",
        metavar="DIR",
        help="state directory: Pod scratch directories, and the CA and token, kept and "
        "reused by the next start (default: a temp dir, removed on exit)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every Pod change")


async def run(args: argparse.Namespace) -> int:
    """Run until SIGINT/SIGTERM, then stop every process the cluster started."""
    host, port = args.listen
    cluster = DevCluster(host, port, token=args.token, workdir=args.workdir)
    await cluster.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        if args.kubeconfig:
            cluster.write_kubeconfig(args.kubeconfig)
        where = f" (kubeconfig: {args.kubeconfig})" if args.kubeconfig else ""
        print(f"devcluster: serving {cluster.url}{where}", file=sys.stderr, flush=True)
        if not args.kubeconfig:
            print(f"devcluster: bearer token {cluster.token}", file=sys.stderr, flush=True)
        print(
            "devcluster: not a production runtime; Pods are local processes. Ctrl-C stops it.",
            file=sys.stderr,
            flush=True,
        )
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await cluster.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(
        prog="kuberun devcluster",
        description="Run a local, single-process Kubernetes API server whose Pods are "
        "local processes (for tests and demos; not a production runtime).",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run(args))
    return uvloop.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
