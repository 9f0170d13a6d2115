"""Give every SSH user their own Pod, with password authentication against your own check.

Run it against devcluster (or any cluster your kubeconfig reaches):

    kuberun devcluster --listen 127.0.0.1:6443 --kubeconfig /tmp/kc &
    printf 'kubernetes: {kubeconfig: /tmp/kc}\\n' > /tmp/kuberun.yaml
    python examples/password_auth.py /tmp/kuberun.yaml --listen 127.0.0.1:2222
    ssh -p 2222 alice@127.0.0.1            # password: wonderland

Ctrl-C or SIGTERM stops it: sessions are told, every Pod is deleted.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import signal

import asyncssh

import kuberun

#: Stands in for your identity backend (LDAP, a database, an HTTP service, ...).
USERS = {"alice": "wonderland"}


def check_password(username: str, password: str) -> bool:
    expected = USERS.get(username)
    return expected is not None and hmac.compare_digest(expected, password)


class Server(kuberun.SSHServer):
    """kuberun does not authenticate: the server you embed it in does."""

    def begin_auth(self, username: str) -> bool:
        return True  # authentication is required for everyone

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return check_password(username, password)


async def main(config_path: str, host: str, port: int) -> None:
    config = kuberun.load_config(config_path)
    api = await kuberun.make_api_client(config.kubernetes)
    gateway = kuberun.Gateway(config, api)
    await gateway.start()  # deletes what an earlier run left, then every five minutes
    host_key = asyncssh.generate_private_key("ssh-ed25519")  # keep yours in a file
    acceptor = await asyncssh.create_server(
        lambda: Server(gateway),
        host,
        port,
        server_host_keys=[host_key],
        **kuberun.server_options(config),
    )
    print(f"listening on {host}:{acceptor.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    acceptor.close()
    await gateway.drain()  # tells open sessions, closes connections, deletes every Pod
    await api.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="kuberun config (YAML)")
    parser.add_argument("--listen", default="127.0.0.1:2222", metavar="HOST:PORT")
    args = parser.parse_args()
    listen_host, _, listen_port = args.listen.rpartition(":")
    asyncio.run(main(args.config, listen_host, int(listen_port)))
