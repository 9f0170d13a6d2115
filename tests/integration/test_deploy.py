"""deploy/ on the real cluster, as an operator would use it.

The gateway image is built from this checkout (tests/realcluster/gateway_image.py) and imported
into the cluster's containerd; deploy/ is applied with kustomize, changed only in the image
reference and in where a Pod finds the API server. The latter is this cluster's doing, not
deploy/'s: it runs no kube-proxy, so the ``kubernetes`` Service address that in-cluster clients
are given does not route, and the overlay points KUBERNETES_SERVICE_HOST/PORT at the node's
apiserver instead. For the same reason the Service's NodePort does not route either:
the tests reach the gateway through ``kubectl port-forward`` to the Service (or to one Pod).

The namespaces ``kuberun`` and ``kuberun-users`` are deploy/'s own, so the module deletes them
before and after; one run at a time per cluster.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from kuberun.janitor import ANNOTATION_GATEWAY_POD

from .clusters import ROOT, real_kubeconfig
from .conftest import SSH_OPTS
from .test_cli import make_key

pytestmark = [pytest.mark.real_only, pytest.mark.openssh, pytest.mark.timeout(900)]

DEPLOY = ROOT / "deploy"
GATEWAY_NS = "kuberun"
USERS_NS = "kuberun-users"
ACCOUNT = f"system:serviceaccount:{GATEWAY_NS}:kuberun"
SHUTDOWN_MESSAGE = "the gateway is shutting down"
T = TypeVar("T")


def poll(cond: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(interval)


@dataclass
class Deployed:
    """deploy/ applied to the cluster, and how to reach it."""

    kubeconfig: Path
    cluster_dir: Path
    key: Path
    tmp: Path
    image: str

    def kubectl(self, *args: str, check: bool = True, timeout: float = 240) -> str:
        result = subprocess.run(
            [kubectl_binary(), "--kubeconfig", str(self.kubeconfig), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            pytest.fail(f"kubectl {' '.join(args)}: exit {result.returncode}\n{result.stderr}")
        return result.stdout

    def objects(self, namespace: str, kind: str, selector: str | None = None) -> list[Any]:
        args = ["-n", namespace, "get", kind, "-o", "yaml"]
        if selector:
            args += ["-l", selector]
        items: list[Any] = yaml.safe_load(self.kubectl(*args))["items"]
        return items

    def gateways(self) -> list[Any]:
        """The gateway Pods that are running, ready and not terminating."""
        return [
            p
            for p in self.objects(GATEWAY_NS, "pods", "app.kubernetes.io/name=kuberun")
            if not p["metadata"].get("deletionTimestamp")
            and any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in p.get("status", {}).get("conditions", [])
            )
        ]

    def user_pods(self, terminating: bool = False) -> dict[str, Any]:
        """The users' Pods; those being deleted (an earlier test's) only if asked for."""
        return {
            p["metadata"]["name"]: p
            for p in self.objects(USERS_NS, "pods")
            if terminating or not p["metadata"].get("deletionTimestamp")
        }

    def ssh_argv(self, port: int, *command: str, tty: bool = False) -> list[str]:
        return [
            "ssh",
            *SSH_OPTS,
            "-i",
            str(self.key),
            "-p",
            str(port),
            "-tt" if tty else "-T",
            "alice@127.0.0.1",
            *command,
        ]

    def ssh(self, port: int, *command: str, tty: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.ssh_argv(port, *command, tty=tty), capture_output=True, text=True, timeout=180
        )

    @contextlib.contextmanager
    def port_forward(self, target: str) -> Iterator[int]:
        """``kubectl port-forward`` to ``target`` (service/kuberun or pod/NAME) port ssh."""
        remote = "22" if target.startswith("service/") else "2222"
        proc = subprocess.Popen(
            [
                kubectl_binary(),
                "--kubeconfig",
                str(self.kubeconfig),
                "-n",
                GATEWAY_NS,
                "port-forward",
                "--address",
                "127.0.0.1",
                target,
                f":{remote}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            found = re.search(r"127\.0\.0\.1:(\d+) ->", line)
            if not found:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"kubectl port-forward {target}: {line!r} {err}")
            yield int(found.group(1))
        finally:
            proc.terminate()
            proc.wait(10)


def kubectl_binary() -> str:
    beside = Path(sys.executable).with_name("kubectl")
    return str(beside) if beside.exists() else "kubectl"


def host_key_one_liner() -> str:
    """The host-key command deploy/README.md documents (the test runs exactly that)."""
    text = (DEPLOY / "README.md").read_text()
    for line in text.splitlines():
        if line.startswith("ssh-keygen "):
            return line
    raise AssertionError("deploy/README.md documents no ssh-keygen command")


def write_overlay(directory: Path, image: str) -> None:
    """A kustomization that uses deploy/ as it is, with this cluster's two differences."""
    name, tag = image.rsplit(":", 1)
    patch = [
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/env/-",
            "value": {"name": "KUBERNETES_SERVICE_HOST", "value": node_address()},
        },
        {
            "op": "add",
            "path": "/spec/template/spec/containers/0/env/-",
            "value": {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
        },
    ]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                # kustomize takes only relative paths to other kustomizations.
                "resources": [os.path.relpath(DEPLOY, directory)],
                "images": [{"name": "kuberun", "newName": name, "newTag": tag}],
                "patches": [
                    {
                        "target": {"kind": "Deployment", "name": "kuberun"},
                        "patch": yaml.safe_dump(patch),
                    },
                ],
            }
        )
    )


def node_address() -> str:
    from tests.realcluster.layout import node_ip

    return node_ip()


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    from tests.realcluster.gateway_image import ensure_gateway_image, import_image

    cluster_dir = os.environ.get("REALCLUSTER_DIR")
    if not cluster_dir:
        pytest.fail("REALCLUSTER_DIR is not set (make test-real sets it)")
    tmp = tmp_path_factory.mktemp("deploy")
    image, archive = ensure_gateway_image()
    import_image(Path(cluster_dir), archive)
    key, public = make_key(tmp / "client")
    d = Deployed(real_kubeconfig(), Path(cluster_dir), key, tmp, image)
    d.kubectl("delete", "namespace", GATEWAY_NS, USERS_NS, "--ignore-not-found", "--wait=true")
    write_overlay(tmp / "overlay", image)
    d.kubectl("apply", "-k", str(tmp / "overlay"))
    env = {**os.environ, "KUBECONFIG": str(d.kubeconfig)}
    env["PATH"] = f"{Path(kubectl_binary()).parent}{os.pathsep}{env['PATH']}"
    subprocess.run(host_key_one_liner(), shell=True, check=True, cwd=tmp, env=env)
    (tmp / "alice").write_bytes(public)
    d.kubectl(
        "-n",
        GATEWAY_NS,
        "create",
        "secret",
        "generic",
        "kuberun-authorized-keys",
        f"--from-file=alice={tmp / 'alice'}",
    )
    d.kubectl("-n", GATEWAY_NS, "rollout", "status", "deployment/kuberun", "--timeout=300s")
    try:
        yield d
    finally:
        d.kubectl(
            "delete",
            "namespace",
            GATEWAY_NS,
            USERS_NS,
            "--ignore-not-found",
            "--wait=false",
            check=False,
        )


def test_deploy_applies_as_written(deployed: Deployed) -> None:
    """Plain `kubectl apply -f deploy/` and `-k deploy/` give the same objects, which the
    API server accepts (server-side dry run) without a Pod Security warning."""
    plain = deployed.kubectl("apply", "-f", str(DEPLOY), "--dry-run=client", "-o", "name")
    kustomized = deployed.kubectl("apply", "-k", str(DEPLOY), "--dry-run=client", "-o", "name")
    assert sorted(plain.split()) == sorted(kustomized.split())
    assert len(plain.split()) == 13
    result = subprocess.run(
        [
            kubectl_binary(),
            "--kubeconfig",
            str(deployed.kubeconfig),
            "apply",
            "-f",
            str(DEPLOY),
            "--dry-run=server",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "PodSecurity" not in result.stderr and "Warning" not in result.stderr, result.stderr
    # The Service offers SSH only; the metrics port is the Pods' alone.
    service = yaml.safe_load(
        deployed.kubectl("-n", GATEWAY_NS, "get", "service/kuberun", "-o", "yaml")
    )
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["ssh"]
    assert service["spec"]["type"] == "NodePort"


def test_gateway_pods_pass_restricted_and_probes_are_quiet(deployed: Deployed) -> None:
    pods = deployed.gateways()
    assert len(pods) == 2
    for pod in pods:
        spec = pod["spec"]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert spec["containers"][0]["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    # The namespaces enforce "restricted"; re-asserting the label checks what runs there now.
    for ns in (GATEWAY_NS, USERS_NS):
        out = subprocess.run(
            [
                kubectl_binary(),
                "--kubeconfig",
                str(deployed.kubeconfig),
                "label",
                "--overwrite",
                "--dry-run=server",
                f"namespace/{ns}",
                "pod-security.kubernetes.io/enforce=restricted",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0 and "violate" not in out.stderr, out.stderr
    # Probes every 5 s (readiness) and 10 s (liveness) for 20 s: not one log line.
    before = {p["metadata"]["name"]: gateway_log(deployed, p) for p in pods}
    time.sleep(20)
    for name, text in before.items():
        after = deployed.kubectl("-n", GATEWAY_NS, "logs", name)
        assert after == text, after[len(text) :]


def gateway_log(deployed: Deployed, pod: Any) -> str:
    return deployed.kubectl("-n", GATEWAY_NS, "logs", pod["metadata"]["name"])


def test_sessions_through_the_service(deployed: Deployed) -> None:
    """exec, pty, sftp, scp, rsync with OpenSSH through the Service; the user's Pod is
    non-root, in its own namespace, annotated with its gateway Pod (no ownerReference)."""
    tmp = deployed.tmp
    blob = os.urandom(3 << 20)
    digest = hashlib.sha256(blob).hexdigest()
    (tmp / "tree").mkdir()
    (tmp / "tree" / "blob").write_bytes(blob)
    with deployed.port_forward("service/kuberun") as port:
        done = deployed.ssh(port, 'id -u; pwd; printf %s "$HOME"')
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["65534", "/home/user", "/home/user"]
        pty = deployed.ssh(port, "tty; exit 3", tty=True)
        assert pty.returncode == 3 and pty.stdout.startswith("/dev/pts/"), pty

        # Each connection has a Pod of its own: one connection (OpenSSH multiplexing) carries
        # every transfer below, so what one puts the next one finds.
        control = ["-o", f"ControlPath={tmp / 'control'}"]
        master = subprocess.run(
            [
                *deployed.ssh_argv(port)[:-1],
                "-o",
                "ControlMaster=yes",
                *control,
                "-N",
                "-f",
                "alice@127.0.0.1",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert master.returncode == 0, master.stderr
        opts = [*SSH_OPTS, *control, "-i", str(deployed.key)]

        def run(*argv: str, stdin: str = "") -> str:
            result = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (argv, result.stderr)
            return result.stdout

        def remote_sha256(path: str) -> str:
            return run("ssh", *opts, "-p", str(port), "alice@127.0.0.1", f"sha256sum {path}")

        try:
            run("scp", *opts, "-P", str(port), str(tmp / "tree" / "blob"), "alice@127.0.0.1:s")
            assert remote_sha256("s").split()[0] == digest
            run("scp", *opts, "-P", str(port), "alice@127.0.0.1:s", str(tmp / "scp-back"))
            assert (tmp / "scp-back").read_bytes() == blob
            run(
                "sftp",
                *opts,
                "-P",
                str(port),
                "-b",
                "-",
                "alice@127.0.0.1",
                stdin=f"put {tmp / 'tree' / 'blob'} f\nget f {tmp / 'sftp-back'}\n",
            )
            assert remote_sha256("f").split()[0] == digest
            assert (tmp / "sftp-back").read_bytes() == blob
            rsh = shlex.join(["ssh", *opts, "-p", str(port)])
            run("rsync", "-a", "-e", rsh, f"{tmp / 'tree'}/", "alice@127.0.0.1:r/")
            assert remote_sha256("r/blob").split()[0] == digest
            run("rsync", "-a", "-e", rsh, "alice@127.0.0.1:r/", f"{tmp / 'rsync-back'}/")
            assert (tmp / "rsync-back" / "blob").read_bytes() == blob
        finally:
            subprocess.run(
                ["ssh", *opts, "-p", str(port), "-O", "exit", "alice@127.0.0.1"],
                capture_output=True,
                timeout=30,
            )

        # A session held open: look at its Pod.
        poll(lambda: not deployed.user_pods(True), 60, "the transfers' Pod deleted")
        with held_session(deployed, port):
            (pod,) = deployed.user_pods().values()
    meta, spec = pod["metadata"], pod["spec"]
    assert "ownerReferences" not in meta
    gateway = meta["annotations"][ANNOTATION_GATEWAY_POD]
    assert gateway.split("/")[1] in {p["metadata"]["name"] for p in deployed.gateways()}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    # The NetworkPolicies select what they mean to: every user Pod, the gateway Pods.
    policies = {p["metadata"]["name"]: p for p in deployed.objects(USERS_NS, "networkpolicy")}
    assert policies["kuberun-users-isolated"]["spec"]["podSelector"] == {}
    (gw_policy,) = deployed.objects(GATEWAY_NS, "networkpolicy")
    selector = ",".join(
        f"{k}={v}" for k, v in gw_policy["spec"]["podSelector"]["matchLabels"].items()
    )
    selected = {p["metadata"]["name"] for p in deployed.objects(GATEWAY_NS, "pods", selector)}
    assert {p["metadata"]["name"] for p in deployed.gateways()} <= selected


@contextlib.contextmanager
def held_session(deployed: Deployed, port: int) -> Iterator[subprocess.Popen[str]]:
    """An SSH session that runs until the gateway ends it (or the block ends)."""
    proc = subprocess.Popen(
        deployed.ssh_argv(port, "echo started; exec sleep 600"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "started\n", proc.stderr
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_rollout_drains_each_replica(deployed: Deployed) -> None:
    """A rollout: the sessions on each old replica get the shutdown message and their Pods
    are deleted, within terminationGracePeriodSeconds; a new login meanwhile lands on a
    replica that is not draining."""
    old = [p["metadata"]["name"] for p in deployed.gateways()]
    assert len(old) == 2
    with contextlib.ExitStack() as stack:
        sessions = {}
        for name in old:
            port = stack.enter_context(deployed.port_forward(f"pod/{name}"))
            sessions[name] = stack.enter_context(held_session(deployed, port))
        user_pods = set(deployed.user_pods())
        assert len(user_pods) == 2
        # Every state the gateway Pods pass through, to see how the old ones' containers end.
        watched = deployed.tmp / "rollout-watch.json"
        watch = stack.enter_context(
            subprocess.Popen(
                [
                    kubectl_binary(),
                    "--kubeconfig",
                    str(deployed.kubeconfig),
                    "-n",
                    GATEWAY_NS,
                    "get",
                    "pods",
                    "-l",
                    "app.kubernetes.io/name=kuberun",
                    "-w",
                    "-o",
                    "json",
                ],
                stdout=stack.enter_context(watched.open("w")),
            )
        )
        started = time.monotonic()
        deployed.kubectl("-n", GATEWAY_NS, "rollout", "restart", "deployment/kuberun")

        def one_ended() -> str | None:
            return next((n for n, s in sessions.items() if s.poll() is not None), None)

        first = poll(one_ended, 240, "a session on an old replica ended")
        # A new login now, through the Service: it lands on a ready, non-draining replica.
        with deployed.port_forward("service/kuberun") as port, held_session(deployed, port):
            (new_pod,) = [p for n, p in deployed.user_pods().items() if n not in user_pods]
            landed = new_pod["metadata"]["annotations"][ANNOTATION_GATEWAY_POD].split("/")[1]
            assert landed != first
        for name, proc in sessions.items():
            proc.wait(240)
            assert proc.stderr is not None
            err = proc.stderr.read()
            assert SHUTDOWN_MESSAGE in err, (name, err)
        deployed.kubectl(
            "-n", GATEWAY_NS, "rollout", "status", "deployment/kuberun", "--timeout=300s"
        )

        def old_gone() -> bool:
            return not set(old) & {
                p["metadata"]["name"] for p in deployed.objects(GATEWAY_NS, "pods")
            }

        poll(old_gone, 120, "old replicas gone")
        watch.terminate()
        watch.wait(10)
        ends = container_ends(watched.read_text())
    poll(lambda: not set(deployed.user_pods(True)) & user_pods, 60, "old users' Pods gone")
    # Each old gateway exited by itself, drained, before the kubelet's SIGKILL.
    assert {name: ends.get(name) for name in old} == {name: (0, "Completed") for name in old}
    assert time.monotonic() - started < 2 * (45 + 60)  # two drains, two starts


def container_ends(stream: str) -> dict[str, tuple[int, str]]:
    """(exit code, reason) of each Pod's terminated container in a `kubectl get -w -o json`
    stream of Pod objects."""
    decoder = json.JSONDecoder()
    ends: dict[str, tuple[int, str]] = {}
    position = 0
    while (position := _skip_space(stream, position)) < len(stream):
        pod, position = decoder.raw_decode(stream, position)
        for status in pod.get("status", {}).get("containerStatuses") or []:
            terminated = status.get("state", {}).get("terminated")
            if terminated:
                ends[pod["metadata"]["name"]] = (terminated["exitCode"], terminated["reason"])
    return ends


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def container_pid(deployed: Deployed, pod: Any) -> int:
    """The host PID of a gateway Pod's container (its main process) from containerd."""
    from tests.realcluster.layout import Binaries, Layout

    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    ctr = [
        str(Binaries().runtime / "ctr"),
        "--address",
        str(Layout(deployed.cluster_dir).containerd_socket),
        "-n",
        "k8s.io",
    ]
    out = subprocess.run([*ctr, "tasks", "ls"], check=True, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        fields = line.split()
        if fields and fields[0] == container_id:
            return int(fields[1])
    raise AssertionError(f"no task for container {container_id}")


@pytest.mark.parametrize("how", ["sigkill", "sigkill-and-force-delete"])
def test_killed_gateway_pods_collected(deployed: Deployed, how: str) -> None:
    """SIGKILL a gateway (no drain): its user Pods are collected. Alone, the container
    restarts in the same Pod and collects its predecessor's Pods at start; with the Pod
    force-deleted, the other replicas' janitor finds the Pods' gateway Pod gone."""
    gateway = deployed.gateways()[0]
    name = gateway["metadata"]["name"]
    with deployed.port_forward(f"pod/{name}") as port, held_session(deployed, port) as session:
        (user_pod,) = deployed.user_pods()
        os.kill(container_pid(deployed, gateway), signal.SIGKILL)
        if how == "sigkill-and-force-delete":
            deployed.kubectl("-n", GATEWAY_NS, "delete", "pod", name, "--grace-period=0", "--force")
        session.wait(60)
        assert session.returncode != 0
    poll(lambda: user_pod not in deployed.user_pods(True), 120, f"{user_pod} collected")
    poll(lambda: len(deployed.gateways()) == 2, 240, "two ready replicas again")


# What the code needs, namespace by namespace; everything else must be denied.
NEEDED = {
    USERS_NS: {
        "pods": {"create", "get", "list", "watch", "patch", "delete"},
        "pods/exec": {"create", "get"},
        "pods/portforward": {"create", "get"},
        "leases.coordination.k8s.io": {
            "create",
            "get",
            "list",
            "watch",
            "update",
            "patch",
            "delete",
        },
    },
    GATEWAY_NS: {"pods": {"get"}},
    "default": {},
}
# Granted to every authenticated account by the default ClusterRoles (system:basic-user;
# system:cluster-trust-bundle-discovery lets every ServiceAccount read ClusterTrustBundles).
EVERYONE = {
    "clustertrustbundles.certificates.k8s.io",
    "selfsubjectreviews.authentication.k8s.io",
    "selfsubjectaccessreviews.authorization.k8s.io",
    "selfsubjectrulesreviews.authorization.k8s.io",
}


def test_service_account_can_do_exactly_what_it_needs(deployed: Deployed) -> None:
    for namespace, needed in NEEDED.items():
        table = deployed.kubectl("auth", "can-i", "--list", "-n", namespace, f"--as={ACCOUNT}")
        granted: dict[str, set[str]] = {}
        for line in table.splitlines()[1:]:
            # Resources  Non-Resource URLs  Resource Names  Verbs
            match = re.match(r"(\S+)\s+\[[^\]]*\]\s+\[[^\]]*\]\s+\[([^\]]*)\]", line)
            if match and match.group(1) not in EVERYONE:
                granted.setdefault(match.group(1), set()).update(match.group(2).split())
        assert granted == needed, (namespace, granted)
    # And by single questions, as an operator would ask them.
    for verb, resource, namespace, allowed in [
        ("create", "pods/exec", USERS_NS, True),
        ("create", "pods/portforward", USERS_NS, True),
        ("create", "pods/portforward", GATEWAY_NS, False),
        ("delete", "pods", USERS_NS, True),
        ("get", "pods", GATEWAY_NS, True),
        ("delete", "pods", GATEWAY_NS, False),
        ("create", "pods/exec", GATEWAY_NS, False),
        ("get", "secrets", GATEWAY_NS, False),
        ("get", "secrets", USERS_NS, False),
        ("create", "pods", "default", False),
        ("list", "nodes", "", False),
    ]:
        args = ["auth", "can-i", verb, resource, f"--as={ACCOUNT}"]
        args += ["-n", namespace] if namespace else []
        answer = deployed.kubectl(*args, check=False).strip()
        assert answer == ("yes" if allowed else "no"), (verb, resource, namespace, answer)
