"""Stopping an embedded gateway without leaving a Pod behind: ``Gateway.drain()``.

    python examples/graceful_shutdown.py /tmp/kuberun.yaml --listen 127.0.0.1:2222 \\
        --authorized-keys ~/.ssh/authorized_keys
    ssh -p 2222 "$USER"@127.0.0.1 'sleep 600'   # then: kill -TERM <pid of this program>

On SIGTERM or SIGINT: stop accepting connections, then ``drain()``. It tells every
open session on its stderr (``kuberun: <message>``, exit status 254), lets output
already produced reach the clients, closes the connections and waits for every Pod's
deletion, at most ``grace`` seconds (default ``timeouts.pod_stop``). It returns the
Pods whose deletion the API server has not accepted by then (also logged by name);
the janitor of the next run with the same gateway id deletes those.

A program that exits without ``drain()`` leaves its Pods running and says so in the
log at exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import asyncssh

import kuberun


class Server(kuberun.SSHServer):
    """Public keys from an OpenSSH authorized_keys file, through asyncssh's own option."""


async def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    config = kuberun.load_config(args.config)
    api = await kuberun.make_api_client(config.kubernetes)
    gateway = kuberun.Gateway(config, api)
    await gateway.start()
    host, _, port = args.listen.rpartition(":")
    acceptor = await asyncssh.create_server(
        lambda: Server(gateway),
        host,
        int(port),
        server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
        authorized_client_keys=args.authorized_keys,
        **kuberun.server_options(config),
    )
    print(f"listening on {host}:{acceptor.sockets[0].getsockname()[1]}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()

    acceptor.close()  # no new connections
    left = await gateway.drain("maintenance: back in five minutes", grace=args.grace)
    await api.close()
    if left:
        names = ", ".join(f"{ref.namespace}/{ref.name}" for ref in left)
        print(f"left running: {names}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="kuberun config (YAML)")
    parser.add_argument("--listen", default="127.0.0.1:2222", metavar="HOST:PORT")
    parser.add_argument("--authorized-keys", required=True, metavar="PATH")
    parser.add_argument("--grace", type=float, default=None, help="seconds for Pod deletions")
    sys.exit(asyncio.run(main(parser.parse_args())))
