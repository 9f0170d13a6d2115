"""Port forwarding into the Pod (``ssh -L``, ``-D``, ``-W``), with OpenSSH as the judge.

devcluster's Pods share the host's network, so a server the test starts on
127.0.0.1 is also "a port of the Pod"; where it matters the server runs in the
Pod itself (started by a session of the same connection).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from typing import Any

import asyncssh
import pytest

from kuberun.metrics import Metrics

from .conftest import Gateway, run_command, wait_for

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int, timeout: float = 20) -> None:
    async def ready() -> bool:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return False
        writer.close()
        return True

    deadline = asyncio.get_running_loop().time() + timeout
    while not await ready():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"nothing listens on port {port}")
        await asyncio.sleep(0.05)


async def ssh_verbose(gateway: Gateway, *args: str, opts: list[str]) -> tuple[int, bytes, bytes]:
    """``ssh`` at LogLevel INFO, where it prints why a channel open failed."""
    argv = [
        "LogLevel=INFO" if a == "LogLevel=ERROR" else a
        for a in gateway.ssh_args(*args, extra_opts=opts)
    ]
    return await run(*argv)


run = run_command


async def start_ssh(gateway: Gateway, *args: str, opts: list[str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *gateway.ssh_args(*args, extra_opts=["-o", "ExitOnForwardFailure=yes", *opts]),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.wait(), 20)


async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A server that sends zeros as fast as the connection takes them."""
    chunk = bytes(MiB)
    try:
        while True:
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass


class Servers:
    """Local TCP servers (devcluster Pods share the host's network)."""

    def __init__(self) -> None:
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self, handler: Any) -> int:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    async def echo(self) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(256 * 1024):
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            writer.close()

        return await self.start(handle)

    async def echo_once(self, size: int) -> int:
        """Echoes the first ``size`` bytes of each connection, then closes it (the
        client's EOF does not reach a Pod's server, so the server must end it)."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(size))
            await writer.drain()
            writer.close()

        return await self.start(handle)


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    s = Servers()
    yield s
    for server in s.servers:
        server.close()


HTTP_SERVER = "exec python3 -m http.server {port} --bind 127.0.0.1 --directory {root}"


async def test_local_forward_to_http_server_in_the_pod(gateway: Gateway, tmp_path: Any) -> None:
    root = tmp_path / "www"
    root.mkdir()
    (root / "hello.txt").write_text("hello from the pod\n")
    pod_port, local = free_port(), free_port()
    ssh = await start_ssh(
        gateway,
        HTTP_SERVER.format(port=pod_port, root=root),
        opts=["-L", f"{local}:localhost:{pod_port}"],
    )
    try:
        await wait_listening(local)
        # The server in the Pod takes a moment to listen: until then, connect failed.
        deadline = asyncio.get_running_loop().time() + gateway.cluster.pod_start
        while True:
            rc, out, err = await run(
                "curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{local}/hello.txt"
            )
            if rc == 0 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.2)
        assert (rc, out) == (0, b"hello from the pod\n"), err
        # Again: one WebSocket per connection, the Pod stays the same.
        rc, out, err = await run("curl", "-sS", "--max-time", "20", f"http://127.0.0.1:{local}/")
        assert rc == 0 and b"hello.txt" in out, err
        assert len(await gateway.cluster.pods()) == 1
    finally:
        await stop(ssh)
    await gateway.wait_no_pods()


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_dynamic_forward_without_a_session(gateway: Gateway, servers: Servers) -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Length: 6\r\n\r\nsocks\n")
        await writer.drain()
        writer.close()

    port = await servers.start(http)
    socks = free_port()
    ssh = await start_ssh(gateway, opts=["-N", "-D", f"127.0.0.1:{socks}"])

    async def get(url: str) -> tuple[int, bytes, bytes]:
        proxy = f"127.0.0.1:{socks}"
        return await run("curl", "-sS", "--max-time", "30", "--socks5-hostname", proxy, url)

    try:
        await wait_listening(socks)
        rc, out, err = await get(f"http://localhost:{port}/")
        assert (rc, out) == (0, b"socks\n"), err
        assert len(await gateway.cluster.pods()) == 1  # the connection's Pod, with no session
        # A SOCKS destination that is not the Pod is refused.
        rc, _, err = await get("http://example.invalid/")
        assert rc != 0
    finally:
        await stop(ssh)
    await gateway.wait_no_pods()


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_stdio_forward_carries_an_http_request(gateway: Gateway, servers: Servers) -> None:
    async def http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        body = b"you asked: " + request.split(b"\r\n")[0]
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + body)
        await writer.drain()
        writer.close()  # the Pod side closes first; the client's EOF came before

    port = await servers.start(http)
    rc, out, err = await gateway.ssh(
        extra_opts=["-W", f"localhost:{port}"], stdin=b"GET /x HTTP/1.0\r\n\r\n"
    )
    assert rc == 0, err
    assert out == b"HTTP/1.0 200 OK\r\n\r\nyou asked: GET /x HTTP/1.0"
    await gateway.wait_no_pods()


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_pod_side_close_delivers_everything(gateway: Gateway, servers: Servers) -> None:
    blob = os.urandom(3 * MiB)

    async def send_and_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(blob)
        await writer.drain()
        writer.close()

    port = await servers.start(send_and_close)
    rc, out, err = await gateway.ssh(extra_opts=["-W", f"127.0.0.1:{port}"], stdin=b"")
    assert rc == 0, err
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(blob).hexdigest()


async def _pump(port: int, size: int) -> tuple[str, str]:
    """Send ``size`` random bytes to ``port`` while reading as many back; both digests."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent = hashlib.sha256()

    async def send() -> None:
        left = size
        while left:
            chunk = os.urandom(min(left, MiB))
            sent.update(chunk)
            writer.write(chunk)
            await writer.drain()
            left -= len(chunk)

    async def receive() -> str:
        got = hashlib.sha256()
        left = size
        while left:
            data = await reader.read(min(left, MiB))
            assert data, f"stream ended {left} bytes early"
            got.update(data)
            left -= len(data)
        return got.hexdigest()

    _, received = await asyncio.gather(send(), receive())
    writer.close()
    return sent.hexdigest(), received


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_64_mib_each_way_byte_exact(gateway: Gateway, servers: Servers) -> None:
    port = await servers.echo()
    local = free_port()
    ssh = await start_ssh(gateway, opts=["-N", "-L", f"{local}:localhost:{port}"])
    try:
        await wait_listening(local)
        sent, received = await asyncio.wait_for(_pump(local, 64 * MiB), 240)
        assert sent == received
    finally:
        await stop(ssh)
    await gateway.wait_no_pods()


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_twenty_forwards_next_to_an_interactive_session(
    gateway: Gateway, servers: Servers
) -> None:
    port = await servers.echo()
    local = free_port()
    proc = await asyncio.create_subprocess_exec(
        *gateway.ssh_args(tty=True, extra_opts=["-L", f"{local}:127.0.0.1:{port}"]),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await wait_listening(local)
        results = await asyncio.wait_for(
            asyncio.gather(*(_pump(local, 256 * 1024) for _ in range(20))), 120
        )
        assert all(sent == received for sent, received in results)
        proc.stdin.write(b"echo interactive-$((6*7))\n")
        await proc.stdin.drain()
        seen = b""
        while b"interactive-42" not in seen:
            seen += await asyncio.wait_for(proc.stdout.read(4096), 30)
        proc.stdin.write(b"exit\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        await stop(proc)
    await gateway.wait_no_pods()


async def test_refused_port_is_connect_failed_with_the_kubelet_message(gateway: Gateway) -> None:
    port = free_port()
    loop = asyncio.get_running_loop()
    started = loop.time()
    rc, _out, err = await ssh_verbose(gateway, opts=["-W", f"localhost:{port}"])
    assert rc == 255
    text = err.decode()
    assert "open failed: connect failed: error forwarding port" in text, text
    assert f"127.0.0.1:{port}: connect: connection refused" in text, text
    assert loop.time() - started < 15  # promptly, not after a timeout
    await gateway.wait_no_pods()


@pytest.mark.parametrize("host", ["example.com", "10.0.0.1", "kubernetes.default"])
async def test_forbidden_host_is_administratively_prohibited(gateway: Gateway, host: str) -> None:
    rc, _, err = await ssh_verbose(gateway, opts=["-W", f"{host}:80"])
    assert rc == 255
    assert (
        "open failed: administratively prohibited: kuberun forwards only to the Pod's own ports"
        in err.decode()
    ), err


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_pod_name_and_ip_are_the_pod(gateway: Gateway, servers: Servers) -> None:
    port = await servers.echo()
    async with gateway.asyncssh_connect() as conn:
        # The first forward starts the Pod; then its name and IP name it too.
        reader, writer = await conn.open_connection("localhost", port)
        writer.write(b"a")
        assert await reader.readexactly(1) == b"a"
        writer.close()
        pod = (await gateway.cluster.pods())[0]
        name, ip = pod["metadata"]["name"], pod["status"]["podIP"]
        for host in (name, ip, "0.0.0.0", "LOCALHOST"):
            reader, writer = await conn.open_connection(host, port)
            writer.write(host.encode())
            assert await reader.readexactly(len(host)) == host.encode()
            writer.close()


async def test_remote_and_unix_forwarding_are_refused(gateway: Gateway) -> None:
    rc, _, err = await gateway.ssh(
        "true", extra_opts=["-o", "ExitOnForwardFailure=yes", "-R", "0:localhost:80"]
    )
    assert rc == 255
    assert "remote port forwarding failed" in err.decode(), err
    async with gateway.asyncssh_connect() as conn:
        with pytest.raises(asyncssh.ChannelOpenError) as info:
            await conn.open_unix_connection("/run/docker.sock")
        assert info.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED
        assert "not to Unix sockets" in info.value.reason
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.start_unix_server(lambda: asyncssh.SSHUNIXSession(), "/tmp/x.sock")
        # The connection is still good.
        result = await conn.run("echo ok", check=True)
        assert result.stdout == b"ok\n" or result.stdout == "ok\n"


async def test_agent_and_x11_forwarding_are_refused_cleanly(gateway: Gateway) -> None:
    rc, out, err = await gateway.ssh(
        "echo ok", extra_opts=["-A", "-o", "ForwardX11=yes", "-o", "ForwardX11Trusted=yes"]
    )
    assert (rc, out) == (0, b"ok\n"), err


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
@pytest.mark.parametrize("gateway_overrides", [{"ssh__permit_open": ["localhost:*", "[::1]:7"]}])
async def test_permit_open_is_honoured(gateway: Gateway, servers: Servers) -> None:
    port = await servers.echo_once(2)
    rc, out, err = await gateway.ssh(extra_opts=["-W", f"localhost:{port}"], stdin=b"hi")
    assert (rc, out) == (0, b"hi"), err
    # Compared as written, as OpenSSH does: 127.0.0.1 is not "localhost".
    for host in ("127.0.0.1", "::1"):
        rc, _, err = await ssh_verbose(gateway, opts=["-W", f"[{host}]:{port}"])
        assert rc == 255
        assert (
            f"administratively prohibited: forwarding to {host} port {port} is not permitted"
            in err.decode()
        ), err


@pytest.mark.parametrize(
    "gateway_overrides",
    [
        {"ssh__permit_open": ["none"]},
        {"ssh__allow_tcp_forwarding": False},
        {"pod__mode": "session"},
    ],
)
async def test_forwarding_switched_off(gateway: Gateway, gateway_overrides: dict[str, Any]) -> None:
    rc, _, err = await ssh_verbose(gateway, opts=["-W", "localhost:80"])
    assert rc == 255
    text = err.decode()
    assert "open failed: administratively prohibited: " in text, text
    reason = {
        "ssh__permit_open": "forwarding to localhost port 80 is not permitted",
        "ssh__allow_tcp_forwarding": "port forwarding is disabled on this server",
        "pod__mode": "kuberun forwards only in pod.mode connection",
    }[next(iter(gateway_overrides))]
    assert reason in text, text


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_client_killed_mid_transfer_leaves_nothing(
    gateway: Gateway, servers: Servers
) -> None:
    port = await servers.start(flood)
    local = free_port()
    ssh = await start_ssh(gateway, opts=["-N", "-L", f"{local}:localhost:{port}"])
    await wait_listening(local)
    reader, writer = await asyncio.open_connection("127.0.0.1", local)
    got = 0
    while got < 8 * MiB:
        got += len(await asyncio.wait_for(reader.read(MiB), 30))
    ssh.kill()
    await ssh.wait()
    writer.close()
    await gateway.wait_no_pods()
    await wait_for(
        lambda: not gateway.cluster.dev.portforward_handler.sessions,
        20,
        "port-forward sessions left",
    )
    shared = gateway.runner.gateway
    await wait_for(lambda: shared.connections == 0, 20, "connections left")
    await wait_for(lambda: not shared._tasks, 20, "gateway tasks left")


@pytest.mark.devcluster_only  # servers on the host are Pod ports only there
async def test_metrics(gateway: Gateway, servers: Servers) -> None:
    port = await servers.echo_once(5)
    rc, out, _ = await gateway.ssh(extra_opts=["-W", f"localhost:{port}"], stdin=b"12345")
    assert (rc, out) == (0, b"12345")
    await gateway.ssh(extra_opts=["-W", f"example.com:{port}"])
    metrics: Metrics = gateway.runner.metrics
    registry = metrics.registry

    def value(name: str, **labels: str) -> float:
        got = registry.get_sample_value(name, labels)
        return got if got is not None else 0.0

    await wait_for(
        lambda: value("kuberun_forwarded_bytes_total", direction="from_pod") == 5, 10, "bytes"
    )
    assert value("kuberun_forwarded_bytes_total", direction="to_pod") == 5
    assert value("kuberun_forward_failures_total", reason="not_the_pod") == 1
    assert value("kuberun_forward_open_seconds_count") == 1
    assert value("kuberun_forward_channels") == 0


# Reads one connection's N bytes, answers two seconds later, then waits for an EOF
# that never comes, until the connection is closed.
LATE_REPLY = """
import socket, sys, time
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
conn, _ = srv.accept()
want, total = int(sys.argv[2]), 0
while total < want:
    total += len(conn.recv(65536))
time.sleep(2)
conn.sendall(b"read %d" % total)
try:
    while conn.recv(65536):
        pass
except OSError:
    pass
print("closed", flush=True)
"""


async def test_client_eof_ends_the_forward_once_the_pod_side_is_quiet(gateway: Gateway) -> None:
    """After the client's EOF the Pod's reply, seconds later, still arrives; then, the
    Pod side silent (its server waits for an EOF it cannot get), the forward ends and
    the Pod side's connection is closed: on devcluster and on a node."""
    port, size = free_port(), MiB
    async with gateway.asyncssh_connect() as conn:
        server = await conn.create_process(
            f"exec python3 -c '{LATE_REPLY}' {port} {size}", encoding=None
        )
        deadline = asyncio.get_running_loop().time() + gateway.cluster.pod_start
        while True:
            try:
                reader, writer = await conn.open_connection("localhost", port)
                break
            except asyncssh.ChannelOpenError as exc:
                # The server in the Pod is not listening yet.
                assert exc.code == asyncssh.OPEN_CONNECT_FAILED, exc.reason
                assert asyncio.get_running_loop().time() < deadline, exc.reason
                await asyncio.sleep(0.2)
        writer.write(os.urandom(size))
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 60)
        assert got == b"read %d" % size
        assert await asyncio.wait_for(server.stdout.readline(), 30) == b"closed\n"
        assert (await asyncio.wait_for(server.wait(), 30)).exit_status == 0
