"""Starting the cluster's daemons so they outlive ``up``, and removing every trace of them.

Daemons run in their own sessions (setsid) with stdin closed and output appended to
DIR/logs/NAME.log, so they survive the shell that ran ``up`` and CI's step ending. A pid file
per daemon, checked against /proc/PID/cmdline, tells ``down`` and a later ``up`` what is ours.

Teardown does not trust the daemons to clean up after themselves (the point is to recover from
a crash): it kills what runs in the kubelet's cgroups and the containerd shims bound to this
cluster's socket, unmounts everything mounted under DIR, deletes the bridge and its veths, and
removes the kubepods cgroups.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from tests.realcluster.common import ClusterError, log, run
from tests.realcluster.layout import BRIDGE, Layout

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Sockets at fixed paths whatever the configured directories (constants in the sources):
# containerd 2.x shims listen under /run/containerd/s (named by a hash), and the kubelet's
# device manager under /var/lib/kubelet/device-plugins. The directories are created on demand.
FIXED_SOCKET_DIRS = (
    (Path("/run/containerd/s"), Path("/run/containerd")),
    (Path("/var/lib/kubelet/device-plugins"), Path("/var/lib/kubelet")),
)
# Directories the kubelet creates outside its --root-dir (fixed paths in its source).
KUBELET_FIXED_DIRS = (Path("/var/log/containers"),)


def start(layout: Layout, name: str, argv: list[str], env: dict[str, str] | None = None) -> int:
    """Start one daemon detached from this process; return its pid."""
    layout.logs.mkdir(parents=True, exist_ok=True)
    layout.pids.mkdir(parents=True, exist_ok=True)
    with (layout.logs / f"{name}.log").open("ab") as out:
        out.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(argv)}\n".encode())
        out.flush()
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=layout.root,
            env=env,
            start_new_session=True,
        )
    (layout.pids / f"{name}.pid").write_text(f"{process.pid}\n")
    return process.pid


def running_pid(layout: Layout, name: str) -> int | None:
    """The pid of the daemon ``name`` if it is alive and still the program we started."""
    try:
        pid = int((layout.pids / f"{name}.pid").read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # A zombie (state Z) has exited; pid reuse shows as a different command line.
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return None
    # An empty command line is a process still inside execve (seen right after Popen returns,
    # under load, while a 150 MB binary is mapped): it is ours and starting.
    if cmdline and str(layout.root).encode() not in cmdline:
        return None
    return pid


def log_tail(layout: Layout, name: str, lines: int = 30) -> str:
    """The last lines of a daemon's log, for error messages."""
    try:
        text = (layout.logs / f"{name}.log").read_text(errors="replace")
    except OSError:
        return f"(no log for {name})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last {lines} lines of {layout.logs / (name + '.log')}:\n{tail}"


def check_alive(layout: Layout, names: list[str]) -> None:
    """Raise (with its log) if any of the started daemons has exited."""
    for name in names:
        if running_pid(layout, name) is None:
            raise ClusterError(f"{name} exited\n{log_tail(layout, name)}")


def _signal_all(pids: list[int], signo: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, signo)
        except ProcessLookupError:
            pass


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if _exists(pid)]
    return alive


def _exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def stop(layout: Layout, names: list[str], timeout: float = 15) -> None:
    """SIGTERM the daemons, SIGKILL whatever has not exited after ``timeout``."""
    pids = [pid for name in names if (pid := running_pid(layout, name)) is not None]
    _signal_all(pids, signal.SIGTERM)
    stubborn = _wait_gone(pids, timeout)
    if stubborn:
        log(f"pids {stubborn} did not exit {timeout:.0f}s after SIGTERM; killing them")
        _signal_all(stubborn, signal.SIGKILL)
        _wait_gone(stubborn, 5)
    for name in names:
        (layout.pids / f"{name}.pid").unlink(missing_ok=True)


def _kubepods_cgroups() -> list[Path]:
    """Every kubepods cgroup directory, deepest first, across all mounted hierarchies."""
    found: list[Path] = []
    if not CGROUP_ROOT.is_dir():
        return found
    for hierarchy in CGROUP_ROOT.iterdir():
        top = hierarchy / "kubepods"
        if top.is_dir():
            for dirpath, _dirs, _files in os.walk(top, topdown=False):
                found.append(Path(dirpath))
    return found


def _cgroup_pids(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for cgroup in cgroups:
        try:
            pids.update(int(line) for line in (cgroup / "cgroup.procs").read_text().split())
        except OSError:
            pass
    return pids


def _shim_pids(layout: Layout) -> set[int]:
    """containerd shims started for this cluster (their command line names its socket)."""
    needle = str(layout.containerd_socket).encode()
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"containerd-shim" in cmdline and needle in cmdline:
            pids.add(int(entry.name))
    return pids


def kill_containers(layout: Layout, machine_wide: bool) -> None:
    """SIGKILL this cluster's shims and (``machine_wide``) every container process.

    Containers are found through the kubepods cgroups rather than the runtime, which may be
    the thing that crashed. Repeated because a process may fork while the others are killed.
    """
    for _attempt in range(20):
        pids = _shim_pids(layout)
        if machine_wide:
            pids |= _cgroup_pids(_kubepods_cgroups())
        if not pids:
            return
        _signal_all(sorted(pids), signal.SIGKILL)
        _wait_gone(sorted(pids), 2)
    raise ClusterError("container processes keep running after SIGKILL; see ps")


def _mounts_under(root: Path) -> list[str]:
    prefix = str(root).rstrip("/") + "/"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == prefix.rstrip("/"):
            points.append(point)
    return points


def unmount_all(root: Path) -> None:
    """Lazily unmount everything mounted at or below ``root``, deepest first."""
    for _attempt in range(5):
        points = _mounts_under(root)
        if not points:
            return
        for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = _mounts_under(root)
    if left:
        raise ClusterError(f"cannot unmount: {left[:5]}")


def remove_network() -> None:
    """Delete the Pod bridge and any veth still enslaved to it."""
    links = subprocess.run(
        ["ip", "-o", "link", "show", "master", BRIDGE], capture_output=True, text=True, check=False
    )
    for line in links.stdout.splitlines():
        # "12: vethabc@if2: <...>": the name is the second field, before the '@'.
        name = line.split(":")[1].strip().split("@")[0]
        subprocess.run(["ip", "link", "del", name], capture_output=True, check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        run(["ip", "link", "del", BRIDGE])


def remove_cgroups() -> None:
    """rmdir the kubepods cgroups; emptied cgroups may take a moment to be released."""
    for _attempt in range(50):
        remaining = _kubepods_cgroups()
        if not remaining:
            return
        for cgroup in remaining:
            try:
                cgroup.rmdir()
            except OSError:
                pass
        time.sleep(0.1)
    raise ClusterError(f"cannot remove cgroups: {[str(p) for p in _kubepods_cgroups()[:5]]}")


def remove_container_log_links(layout: Layout) -> None:
    """The kubelet links each container log from /var/log/containers; drop links into DIR."""
    for directory in KUBELET_FIXED_DIRS:
        if not directory.is_dir():
            continue
        for link in directory.iterdir():
            if link.is_symlink() and os.readlink(link).startswith(str(layout.root) + "/"):
                link.unlink()
        try:
            directory.rmdir()  # the kubelet created it; kept if anything else lives there
        except OSError:
            pass


def remove_stale_sockets() -> None:
    """Delete sockets nobody listens on in the fixed directories (killed daemons leave them).

    A socket some live process serves (another containerd's shim, another kubelet) is listed in
    /proc/net/unix and kept; directories are removed only when empty.
    """
    listening = {
        fields[-1]
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]
        if len(fields := line.split()) >= 8
    }
    for sockets, parent in FIXED_SOCKET_DIRS:
        if not sockets.is_dir():
            continue
        for entry in sockets.iterdir():
            if entry.is_socket() and str(entry) not in listening:
                entry.unlink(missing_ok=True)
        for directory in (sockets, parent):
            try:
                directory.rmdir()
            except OSError:
                break


def remove_iptables_chains() -> None:
    """Delete the KUBE-* chains the kubelet adds and the CNI-* chains of the portmap plugin.

    The kubelet installs KUBE-FIREWALL (hooked into INPUT and OUTPUT) and canary chains in
    every table; they are machine state, so ``down`` removes them: first the rules jumping
    into them from other chains, then the chains themselves.
    """
    ours = ("KUBE-", "CNI-")
    for tool in ("iptables", "ip6tables"):
        for table in ("filter", "nat", "mangle"):
            listed = subprocess.run(
                [tool, "-w", "-t", table, "-S"], capture_output=True, text=True, check=False
            )
            if listed.returncode != 0:
                continue  # tool or table absent: nothing of ours can be there
            chains = []
            for line in listed.stdout.splitlines():
                words = shlex.split(line)  # rules may carry quoted comments
                if words[:1] == ["-N"] and words[1].startswith(ours):
                    chains.append(words[1])
                elif words[:1] == ["-A"] and not words[1].startswith(ours):
                    jump = words[words.index("-j") + 1] if "-j" in words else ""
                    if jump.startswith(ours):
                        # "-A INPUT ..." → "-D INPUT ...": the same rule, deleted.
                        subprocess.run(
                            [tool, "-w", "-t", table, "-D", *words[1:]],
                            capture_output=True,
                            check=False,
                        )
            for flag in ("-F", "-X"):
                for chain in chains:
                    subprocess.run(
                        [tool, "-w", "-t", table, flag, chain], capture_output=True, check=False
                    )


def teardown(layout: Layout, components: list[str], machine_wide: bool = True) -> None:
    """Stop the daemons and remove containers, mounts, devices and cgroups of this cluster.

    ``machine_wide=False`` (another DIR's cluster is running) touches only what is this DIR's
    own: its daemons, its shims, its mounts. The Pod bridge, the kubepods cgroups, the
    iptables chains and the fixed socket directories are shared and belong to the other one.
    """
    # The kubelet first, so it does not restart what is being killed; then the runtime.
    stop(layout, ["kubelet"])
    stop(layout, ["containerd"])
    kill_containers(layout, machine_wide)
    # The apiserver waits for etcd while shutting down: clients first, etcd last.
    stop(layout, [c for c in components if c.startswith("kube-") and c != "kube-apiserver"])
    stop(layout, ["kube-apiserver"])
    stop(layout, [c for c in components if c not in ("kubelet", "containerd")])
    unmount_all(layout.root)
    remove_container_log_links(layout)
    if machine_wide:
        remove_network()
        remove_cgroups()
        remove_stale_sockets()
        remove_iptables_chains()
    log(f"stopped the cluster in {layout.root}")
