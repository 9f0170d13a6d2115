"""kuberun inside an asyncssh server configured your way: your host key file, your own
public-key lookup, your asyncssh options on top of the ones kuberun needs.

    python examples/embedding.py /tmp/kuberun.yaml --listen 127.0.0.1:2222 \\
        --host-key /tmp/host_key --user alice=~/.ssh/id_ed25519.pub
    ssh -p 2222 alice@127.0.0.1

Of the config, library use honours ``kubernetes``, ``pod``, ``timeouts``, ``audit`` and the
``ssh`` keys the sessions and connections need (``accept_env``, ``max_sessions``,
``max_startups``, and ``login_grace_time`` and ``ciphers`` through
``kuberun.server_options``). ``ssh.listen``, ``ssh.host_keys``,
``ssh.authorized_keys``, ``ssh.banner``, ``metrics`` and ``logging`` belong to the
``kuberun serve`` gateway: here the program decides them, as below.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

import asyncssh

import kuberun


class Server(kuberun.SSHServer):
    """Public keys from your own source (a directory service, a database, ...)."""

    keys: dict[str, str] = {}  # username -> authorized_keys text

    def begin_auth(self, username: str) -> bool:
        assert self.conn is not None
        text = self.keys.get(username)
        if text:
            self.conn.set_authorized_keys(asyncssh.import_authorized_keys(text))
        return True

    def public_key_auth_supported(self) -> bool:
        return True


def host_key(path: Path) -> asyncssh.SSHKey:
    """Your host key, made once and kept (clients pin it)."""
    if not path.exists():
        path.write_bytes(asyncssh.generate_private_key("ssh-ed25519").export_private_key())
        path.chmod(0o600)
    return asyncssh.read_private_key(str(path))


async def main(args: argparse.Namespace, key: asyncssh.SSHKey) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    config = kuberun.load_config(args.config)
    api = await kuberun.make_api_client(config.kubernetes)
    gateway = kuberun.Gateway(config, api)
    await gateway.start()
    options = {
        **kuberun.server_options(config),  # what kuberun needs: raw bytes, no line editor...
        "server_host_keys": [key],
        "server_version": "ExampleGateway_1.0",
        "keepalive_interval": 30,  # drop clients that vanished without a word
        "keepalive_count_max": 3,
        "login_timeout": 30,  # overrides ssh.login_grace_time
    }
    host, _, port = args.listen.rpartition(":")
    acceptor = await asyncssh.create_server(lambda: Server(gateway), host, int(port), **options)
    print(f"listening on {host}:{acceptor.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    acceptor.close()
    await gateway.drain()
    await api.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="kuberun config (YAML)")
    parser.add_argument("--listen", default="127.0.0.1:2222", metavar="HOST:PORT")
    parser.add_argument("--host-key", required=True, metavar="PATH", help="made if missing")
    parser.add_argument(
        "--user", action="append", default=[], metavar="NAME=PUBKEY_FILE", help="repeatable"
    )
    arguments = parser.parse_args()
    for user in arguments.user:
        name, _, key_file = user.partition("=")
        Server.keys[name] = Path(key_file).expanduser().read_text()
    asyncio.run(main(arguments, host_key(Path(arguments.host_key))))
