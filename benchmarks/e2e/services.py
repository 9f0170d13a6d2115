"""Starting and talking to the processes under test: devcluster, gateways, the direct server."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .procstat import cpu_seconds, rss_bytes

__all__ = ["ROOT", "DevclusterProc", "Service", "SshMaster", "ssh_base"]

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

CIPHER = "aes128-gcm@openssh.com"


def _child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # The relay variant is chosen explicitly per process.
    env.pop("KUBERUN_NO_EXTENSIONS", None)
    env.update(extra or {})
    return env


@dataclass
class Service:
    """A benchmark server process that prints one JSON line when it is ready."""

    name: str
    popen: subprocess.Popen[bytes]
    info: dict[str, Any]

    @classmethod
    def start(
        cls,
        name: str,
        argv: list[str],
        log: Path,
        timeout: float = 60,
        *,
        env: Mapping[str, str] | None = None,
        stdin: bool = False,
    ) -> Service:
        """Start ``argv`` with ``env`` added to the environment; with ``stdin``, its
        stdin is a pipe (:meth:`ask` talks to it), else inherited."""
        logf = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=logf,
            cwd=ROOT,
            env=_child_env(env),
        )
        assert popen.stdout is not None
        deadline = time.monotonic() + timeout
        line = popen.stdout.readline()
        if not line or time.monotonic() > deadline:
            popen.kill()
            raise RuntimeError(f"{name} did not start; see {log}")
        return cls(name, popen, json.loads(line))

    @property
    def pid(self) -> int:
        return int(self.info.get("pid", self.popen.pid))

    @property
    def port(self) -> int:
        return int(self.info["port"])

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        """One JSON line to the process's stdin, its one-line JSON answer back."""
        assert self.popen.stdin is not None and self.popen.stdout is not None
        self.popen.stdin.write(json.dumps(request).encode() + b"\n")
        self.popen.stdin.flush()
        line = self.popen.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} exited (rc {self.popen.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stop(self, timeout: float = 60) -> None:
        if self.popen.stdin is not None:
            self.popen.stdin.close()  # a process serving requests ends on EOF
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class DevclusterProc:
    """devcluster as its own process (``python -m kuberun.devcluster``), uvloop like the gateway."""

    popen: subprocess.Popen[bytes]
    kubeconfig: Path
    url: str = ""
    token: str = ""
    _ssl: ssl.SSLContext | None = field(default=None, repr=False)

    @classmethod
    def start(cls, workdir: Path, log: Path, timeout: float = 60) -> DevclusterProc:
        kubeconfig = workdir / "kubeconfig"
        logf = open(log, "ab")  # noqa: SIM115 - lives as long as the process
        popen = subprocess.Popen(
            [
                PY,
                "-m",
                "kuberun.devcluster",
                "--kubeconfig",
                str(kubeconfig),
                "--workdir",
                str(workdir / "pods"),
            ],
            stdout=logf,
            stderr=logf,
            cwd=ROOT,
            env=_child_env(),
        )
        deadline = time.monotonic() + timeout
        while not kubeconfig.exists():
            if popen.poll() is not None or time.monotonic() > deadline:
                popen.kill()
                raise RuntimeError(f"devcluster did not start; see {log}")
            time.sleep(0.05)
        proc = cls(popen, kubeconfig)
        proc._load()
        return proc

    def _load(self) -> None:
        config = yaml.safe_load(self.kubeconfig.read_text())
        cluster = config["clusters"][0]["cluster"]
        self.url = cluster["server"]
        self.token = config["users"][0]["user"]["token"]
        ca = base64.b64decode(cluster["certificate-authority-data"])
        with tempfile.NamedTemporaryFile("wb", suffix=".pem", delete=False) as f:
            f.write(ca)
        self._ssl = ssl.create_default_context(cafile=f.name)
        os.unlink(f.name)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def _call(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, context=self._ssl, timeout=60) as resp:
            return json.loads(resp.read())

    def requests(self) -> list[dict[str, Any]]:
        """devcluster's request log (its admin endpoint, which never counts itself)."""
        return list(self._call("GET", "/_devcluster/requests")["requests"])

    def clear_requests(self) -> None:
        self._call("DELETE", "/_devcluster/requests")

    def pod_count(self) -> int:
        return len(self._call("GET", "/api/v1/pods")["items"])

    def pod_names(self) -> list[str]:
        """Running Pods in the default namespace."""
        items = self._call("GET", "/api/v1/namespaces/default/pods")["items"]
        return [
            p["metadata"]["name"] for p in items if p.get("status", {}).get("phase") == "Running"
        ]

    def process_count(self) -> int:
        """Processes devcluster started that are alive (its children, and theirs)."""
        out = subprocess.run(
            ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True, check=True
        ).stdout
        children: dict[int, list[int]] = {}
        for line in out.splitlines():
            pid, ppid = (int(x) for x in line.split())
            children.setdefault(ppid, []).append(pid)
        count, todo = 0, list(children.get(self.pid, []))
        while todo:
            pid = todo.pop()
            count += 1
            todo.extend(children.get(pid, []))
        return count

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(60)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def ssh_base(key: Path, port: int, *extra: str) -> list[str]:
    """OpenSSH client arguments shared by every run: aes128-gcm, key auth, no host checks."""
    return [
        "ssh",
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "LogLevel=ERROR",
        "-o",
        f"Ciphers={CIPHER}",
        "-o",
        "Compression=no",
        "-i",
        str(key),
        "-p",
        str(port),
        *extra,
    ]


@dataclass
class SshMaster:
    """One OpenSSH ControlMaster connection; transfers run as sessions multiplexed on it,
    so a transfer's time holds no key exchange and no Pod start (the Pod is created once,
    when the master authenticates). The master does all the crypto; the mux client only
    hands it its stdin/stdout file descriptors."""

    key: Path
    port: int
    socket: Path
    user: str = "bench"
    pid: int = 0

    def start(self) -> None:
        subprocess.run(
            [
                *ssh_base(self.key, self.port),
                "-M",
                "-S",
                str(self.socket),
                "-o",
                "ControlPersist=no",
                "-f",
                "-N",
                f"{self.user}@127.0.0.1",
            ],
            check=True,
            timeout=120,
        )
        out = subprocess.run(
            ["ssh", "-S", str(self.socket), "-O", "check", "x"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        self.pid = int(out.split("pid=")[1].split(")")[0])

    def args(self, *command: str) -> list[str]:
        return [
            "ssh",
            "-F",
            "/dev/null",
            "-S",
            str(self.socket),
            "-o",
            "LogLevel=ERROR",
            "-T",
            f"{self.user}@127.0.0.1",
            *command,
        ]

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        subprocess.run(
            ["ssh", "-S", str(self.socket), "-O", "exit", "x"], capture_output=True, check=False
        )
