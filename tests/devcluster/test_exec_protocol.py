"""The exec WebSocket, byte for byte (exec protocol spec §0-§2, §5 vectors)."""

from __future__ import annotations

import asyncio
import base64
import json
import os

import pytest

from kuberun.devcluster import DevCluster

from .conftest import Api, RawWebSocket, exec_params, pod

EXEC = "/api/v1/namespaces/default/pods/web/exec"
V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"

V5_EXIT3 = (
    b'{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: '
    b'command terminated with exit code 3","reason":"NonZeroExitCode","details":{"causes":'
    b'[{"reason":"ExitCode","message":"3"}]}}'
)
V4_EXIT3 = (
    b'{"status":"Failure","message":"command terminated with non-zero exit code: '
    # Go's encoder escapes > and & inside strings.
    b'error executing command [sh -c echo hi; echo err \\u003e\\u00262; exit 3], exit code 3",'
    b'"reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}'
)
SCRIPT = ["sh", "-c", "echo hi; echo err >&2; exit 3"]


@pytest.fixture
async def web(api: Api) -> Api:
    await api.create_pod(pod("web"))
    await api.running("web")
    return api


async def _session(
    cluster: DevCluster, protocols: list[str] | None, command: list[str], **flags: bool
) -> tuple[RawWebSocket, list[tuple[int, bytes]], bytes | None]:
    ws = await RawWebSocket.connect(cluster, EXEC, exec_params(command, **flags), protocols)
    assert ws.status == 101, ws.body
    messages, close = await ws.messages_until_close()
    await ws.close()
    return ws, messages, close


@pytest.mark.parametrize(
    ("offer", "chosen"),
    [
        (["v5.channel.k8s.io, v4.channel.k8s.io"], V5),
        (["v4.channel.k8s.io, v5.channel.k8s.io"], V5),
        (["v4.channel.k8s.io"], V4),
        (["v4.base64.channel.k8s.io, channel.k8s.io"], "v4.base64.channel.k8s.io"),
        (["v2.channel.k8s.io, channel.k8s.io"], "channel.k8s.io"),
        (["v4.channel.k8s.io", "v5.channel.k8s.io"], V4),  # only the first header line counts
        (None, None),
    ],
)
async def test_negotiation(
    web: Api, cluster: DevCluster, offer: list[str] | None, chosen: str | None
) -> None:
    ws = await RawWebSocket.connect(cluster, EXEC, exec_params(["true"], stdout=True), offer)
    assert ws.status == 101
    assert ws.headers.get("sec-websocket-protocol") == chosen
    assert "audit-id" not in ws.headers
    await ws.close()


@pytest.mark.parametrize("offer", ["v3.channel.k8s.io", "v5.channels.k8s.io"])
async def test_no_acceptable_protocol_is_403(web: Api, cluster: DevCluster, offer: str) -> None:
    ws = await RawWebSocket.connect(cluster, EXEC, exec_params(["true"], stdout=True), [offer])
    assert ws.status == 403
    assert ws.body == b""
    await ws.close()


async def test_v5_session_bytes(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(SCRIPT, stdout=True, stderr=True), [f"{V5}, {V4}"]
    )
    _opcode, payload, header = await ws.frame()
    assert header + payload == bytes.fromhex("820101")  # the initial empty message
    messages, close = await ws.messages_until_close()
    assert close == bytes.fromhex("03e8")
    assert all(op == 0x2 for op, _ in messages)
    assert sorted(p for _, p in messages[:-1]) == [b"\x01hi\n", b"\x02err\n"]
    assert messages[-1][1] == b"\x03" + V5_EXIT3
    await ws.close()


async def test_v4_status_wording_and_success(web: Api, cluster: DevCluster) -> None:
    _, messages, _ = await _session(cluster, [V4], SCRIPT, stdout=True, stderr=True)
    assert messages[-1][1] == b"\x03" + V4_EXIT3
    _, messages, _ = await _session(cluster, [V4], ["true"], stdout=True)
    assert messages == [(2, b"\x01"), (2, b'\x03{"status":"Success"}')]


async def test_v1_status_is_text_and_absent_on_success(web: Api, cluster: DevCluster) -> None:
    _, messages, _ = await _session(cluster, ["channel.k8s.io"], ["true"], stdout=True)
    assert messages == [(2, b"\x01")]
    _, messages, _ = await _session(cluster, None, ["sh", "-c", "exit 3"], stdout=True)
    assert messages[-1][1] == (
        b"\x03command terminated with non-zero exit code: error executing command "
        b"[sh -c exit 3], exit code 3"
    )


async def test_base64_protocol(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["cat"], stdin=True, stdout=True), ["v4.base64.channel.k8s.io"]
    )
    opcode, payload, header = await ws.frame()
    assert header + payload == bytes.fromhex("810131")
    ws.send(b"0" + base64.b64encode(b"hello\n"), opcode=0x1)
    opcode, payload, _ = await ws.frame()
    assert (opcode, payload) == (0x1, b"1aGVsbG8K")
    await ws.close()


async def test_v5_close_signal_ends_stdin(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["wc", "-c"], stdin=True, stdout=True), [V5]
    )
    await ws.frame()
    ws.send(b"\x00abc")
    ws.send(b"\x00defg")
    ws.send(b"\xff\x00")
    ws.send(b"\x00ignored after close")
    messages, close = await ws.messages_until_close()
    assert close == bytes.fromhex("03e8")
    out = b"".join(p[1:] for _, p in messages if p[:1] == b"\x01")
    assert out.strip() == b"7"
    assert messages[-1][1] == b'\x03{"metadata":{},"status":"Success"}'
    await ws.close()


async def test_malformed_close_signal_drops_the_connection(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["cat"], stdin=True, stdout=True), [V5]
    )
    await ws.frame()
    ws.send(b"\xff\x00\x00")
    messages, _close = await ws.messages_until_close()
    assert messages == []
    await ws.close()


async def test_output_messages_are_at_most_32k(web: Api, cluster: DevCluster) -> None:
    total = 3_000_000
    _, messages, _ = await _session(
        cluster, [V5], ["head", "-c", str(total), "/dev/zero"], stdout=True
    )
    data = [p for _, p in messages if p[:1] == b"\x01"]
    assert max(len(p) for p in data) <= 32 * 1024 + 1
    assert sum(len(p) - 1 for p in data) == total
    assert all(len(p) > 1 for p in data[1:])  # only the initial message is empty


async def test_ping_is_answered(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["cat"], stdin=True, stdout=True), [V5]
    )
    await ws.frame()
    ws.send(b"", opcode=0x9)
    opcode, payload, header = await ws.frame()
    assert header + payload == bytes.fromhex("8a00")
    ws.send(b"\x03\xe8", opcode=0x8)
    opcode, payload, _ = await ws.frame()
    assert (opcode, payload) == (0x8, b"\x03\xe8")
    assert await asyncio.wait_for(ws.reader.read(), 10) == b""
    await ws.close()


async def test_tty_merges_stderr_and_resizes(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster,
        EXEC,
        exec_params(["sh"], stdin=True, stdout=True, tty=True),
        [V5],
    )
    await ws.frame()
    # One resize split across two messages (each message carries the channel byte).
    ws.send(b'\x04{"Width":101,')
    ws.send(b'\x04"Height":33}\n')
    ws.send(b"\x00stty size\n")
    seen = b""
    while b"33 101" not in seen:
        _, payload, _ = await ws.frame()
        seen += payload[1:]
    ws.send(b'\x04{"width":90,"height":20}\n')  # Go decodes keys case-insensitively
    ws.send(b"\x00stty size; echo oops >&2; exit 4\n")
    messages, _ = await ws.messages_until_close()
    text = b"".join(p[1:] for _, p in messages if p[:1] == b"\x01")
    assert b"20 90" in text
    assert b"oops\r\n" in text
    assert not [p for _, p in messages if p[:1] == b"\x02"]
    assert json.loads(messages[-1][1][1:])["details"]["causes"][0]["message"] == "4"
    await ws.close()


async def test_missing_binary_is_internal_error(web: Api, cluster: DevCluster) -> None:
    for proto, prefix in (
        (V5, "Internal error occurred: Internal error occurred: "),
        (V4, "Internal error occurred: "),
    ):
        _, messages, _ = await _session(cluster, [proto], ["no-such-binary"], stdout=True)
        status = json.loads(messages[-1][1][1:])
        assert status["reason"] == "InternalError"
        assert status["code"] == 500
        assert status["message"].startswith(prefix + "error executing command in container")
        assert 'exec: "no-such-binary": executable file not found in $PATH' in status["message"]
        if proto == V5:  # the translator's Status; the kubelet's has no metadata, no details
            assert list(status) == ["metadata", "status", "message", "reason", "details", "code"]
        else:
            assert list(status) == ["status", "message", "reason", "code"]


async def test_errors_before_the_upgrade(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster,
        "/api/v1/namespaces/default/pods/nope/exec",
        exec_params(["true"], stdout=True),
        [V5],
    )
    assert ws.status == 404
    assert ws.body == (
        b'{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure",'
        b'"message":"pods \\"nope\\" not found","reason":"NotFound",'
        b'"details":{"name":"nope","kind":"pods"},"code":404}\n'
    )
    assert ws.headers["content-type"] == "application/json"
    await ws.close()
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["true"], stdout=True, container="foo"), [V5]
    )
    assert ws.status == 400
    assert json.loads(ws.body)["message"] == "container foo is not valid for pod web"
    await ws.close()
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["true"], stdout=True), [V5], upgrade=False
    )
    assert ws.status == 400
    assert json.loads(ws.body)["message"] == "Upgrade request required"
    await ws.close()
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["true"], stdout=True), [V5], method="POST"
    )
    assert (ws.status, ws.body) == (405, b"bad method")
    await ws.close()
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["true"], stdout=True), [V5], token="wrong"
    )
    assert ws.status == 401
    assert json.loads(ws.body)["reason"] == "Unauthorized"
    await ws.close()
    ws = await RawWebSocket.connect(cluster, EXEC, exec_params(["true"]), [V4])
    assert (ws.status, ws.body) == (400, b"you must specify at least 1 of stdin, stdout, stderr")
    await ws.close()


async def test_container_choice(api: Api, cluster: DevCluster) -> None:
    two = pod("two", containers=[{"name": "a", "image": "x"}, {"name": "b", "image": "x"}])
    await api.create_pod(two)
    await api.running("two")
    path = "/api/v1/namespaces/default/pods/two/exec"
    ws = await RawWebSocket.connect(cluster, path, exec_params(["true"], stdout=True), [V5])
    assert ws.status == 400
    assert json.loads(ws.body)["message"] == (
        "a container name must be specified for pod two, choose one of: [a b]"
    )
    await ws.close()
    params = exec_params(["sh", "-c", "echo $HOSTNAME"], stdout=True, container="b")
    ws = await RawWebSocket.connect(cluster, path, params, [V5])
    messages, _ = await ws.messages_until_close()
    assert messages[1][1] == b"\x01two\n"
    await ws.close()


async def test_container_not_running(api: Api, cluster: DevCluster) -> None:
    slow = pod("web")
    slow["spec"]["containers"][0]["image"] = "kuberun.devcluster/slow:30"
    await api.create_pod(slow)
    await api.wait_pod("web", lambda p: p["spec"].get("nodeName") == "devcluster")
    ws = await RawWebSocket.connect(cluster, EXEC, exec_params(["true"], stdout=True), [V5])
    assert ws.status == 101
    messages, _ = await ws.messages_until_close()
    expected = bytes.fromhex(
        "037b226d65746164617461223a7b7d2c22737461747573223a224661696c757265222c226d6573736167"
        "65223a22496e7465726e616c206572726f72206f636375727265643a20756e61626c6520746f20757067"
        "7261646520636f6e6e656374696f6e3a20636f6e7461696e6572206e6f7420666f756e6420285c226d61"
        "696e5c2229222c22726561736f6e223a22496e7465726e616c4572726f72222c2264657461696c73223a"
        "7b22636175736573223a5b7b226d657373616765223a22756e61626c6520746f20757067726164652063"
        "6f6e6e656374696f6e3a20636f6e7461696e6572206e6f7420666f756e6420285c226d61696e5c222922"
        "7d5d7d2c22636f6465223a3530307d"
    )
    assert messages == [(2, b"\x01"), (2, expected)]  # spec §5.2 vector
    await ws.close()
    ws = await RawWebSocket.connect(cluster, EXEC, exec_params(["true"], stdout=True), [V4])
    assert (ws.status, ws.body) == (500, b'container not found ("main")')
    await ws.close()


async def test_drop_exec_fault(web: Api, cluster: DevCluster) -> None:
    fault = cluster.faults.drop_exec(after_bytes=100_000, name="^web$")
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["head", "-c", "1000000", "/dev/zero"], stdout=True), [V5]
    )
    received = 0
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        while True:
            opcode, payload, _ = await ws.frame()
            assert opcode == 0x2 and payload[:1] == b"\x01", "no status, no Close: a lost stream"
            received += len(payload) - 1
    assert received == 100_000
    assert fault.hits == 1 and not fault.active
    await ws.close()


async def test_client_close_does_not_kill_the_process(web: Api, cluster: DevCluster) -> None:
    marker = f"/tmp/devcluster-test-{os.getpid()}-{id(cluster)}"
    ws = await RawWebSocket.connect(
        cluster,
        EXEC,
        exec_params(["sh", "-c", f"sleep 0.3; touch {marker}"], stdout=True),
        [V5],
    )
    await ws.frame()
    ws.send(b"\x03\xe8", opcode=0x8)
    _, close = await ws.messages_until_close()
    assert close == b"\x03\xe8"
    await ws.close()
    for _ in range(200):
        if os.path.exists(marker):
            break
        await asyncio.sleep(0.02)
    assert os.path.exists(marker)
    os.unlink(marker)


async def test_slow_reader_keeps_memory_bounded(web: Api, cluster: DevCluster) -> None:
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["cat", "/dev/zero"], stdout=True), [V5]
    )
    await ws.frame()
    before = rss()
    await asyncio.sleep(1.5)  # the client reads nothing; /dev/zero never ends
    grown = rss() - before
    assert grown < 64 << 20, f"server buffered {grown} bytes for a stalled reader"
    for _ in range(10):
        await ws.frame()
    await ws.close()


async def test_junk_messages_are_ignored(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["cat"], stdin=True, stdout=True, tty=False), [V5]
    )
    await ws.frame()
    for junk in (b"", b"\x07data", b"\x01to-stdout?", b"\x04not json", b"\x04{}", b"\xff\x01"):
        ws.send(junk)
    ws.send(b"\x00still alive\n")
    opcode, payload, _ = await ws.frame()
    assert (opcode, payload) == (0x2, b"\x01still alive\n")
    ws.send(b"\xff\x00")
    messages, _ = await ws.messages_until_close()
    assert messages[-1][1] == b'\x03{"metadata":{},"status":"Success"}'
    await ws.close()


async def test_v4_ignores_close_signal(web: Api, cluster: DevCluster) -> None:
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["cat"], stdin=True, stdout=True), [V4]
    )
    await ws.frame()
    ws.send(b"\xff\x00")  # "channel 255" on v4: dropped, stdin stays open
    ws.send(b"\x00after\n")
    _opcode, payload, _ = await ws.frame()
    assert payload == b"\x01after\n"
    await ws.close()


async def test_tty_process_starts_with_the_first_size(web: Api, cluster: DevCluster) -> None:
    """A client sends its size right after the upgrade; the program sees it at once."""
    ws = await RawWebSocket.connect(
        cluster, EXEC, exec_params(["stty", "size"], stdout=True, tty=True), [V5]
    )
    await ws.frame()
    ws.send(b'\x04{"Width":101,"Height":33}\n')
    messages, _ = await ws.messages_until_close()
    text = b"".join(p[1:] for _, p in messages if p[:1] == b"\x01")
    assert text == b"33 101\r\n"
    await ws.close()
