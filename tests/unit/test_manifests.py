"""Tests of kuberun.manifests: labels, selectors, the Pod, and the sh wrappers run for real."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kuberun.config import PodConfig, config_from_dict
from kuberun.errors import ConfigError
from kuberun.manifests import (
    ANNOTATION_CLIENT_ADDRESS,
    ANNOTATION_USERNAME,
    LABEL_CONNECTION_ID,
    LABEL_GATEWAY,
    LABEL_MANAGED_BY,
    LABEL_SESSION_ID,
    LABEL_USERNAME,
    MANAGED_BY,
    SIGNAL_NAMES,
    build_pod,
    dns_safe_username,
    env_allowed,
    exec_argv,
    id_label_value,
    is_valid_label_value,
    kill_argv,
    label_selector,
    managed_selector,
    pid_file_path,
    sanitize_label_value,
    valid_env_name,
    wrap_command,
)

# Every POSIX shell on this machine; the wrapper must work on each.
SHELLS = sorted(
    {
        os.path.realpath(p)
        for p in (
            "/bin/sh",
            shutil.which("dash"),
            shutil.which("bash"),
            shutil.which("busybox"),
            shutil.which("mksh"),
        )
        if p
    }
)


def shell_argv(shell: str, argv: list[str]) -> list[str]:
    """``argv`` from the wrapper, run by ``shell`` instead of /bin/sh."""
    assert argv[:2] == ["/bin/sh", "-c"]
    if shell.endswith("busybox"):
        return [shell, "sh", *argv[1:]]
    if shell.endswith("bash"):
        return [shell, "--posix", *argv[1:]]
    return [shell, *argv[1:]]


def run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(argv, capture_output=True, env=env, timeout=20, check=False, **kwargs)


# --------------------------------------------------------------------------
# Constants


def test_label_names_are_the_contract() -> None:
    assert LABEL_MANAGED_BY == "app.kubernetes.io/managed-by"
    assert MANAGED_BY == "kuberun"
    assert LABEL_CONNECTION_ID == "kuberun.io/connection-id"
    assert LABEL_USERNAME == "kuberun.io/username"
    assert LABEL_GATEWAY == "kuberun.io/gateway"
    assert LABEL_SESSION_ID == "kuberun.io/session-id"
    assert ANNOTATION_CLIENT_ADDRESS == "kuberun.io/client-address"
    assert ANNOTATION_USERNAME == "kuberun.io/username"


# --------------------------------------------------------------------------
# Label values


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("", True),
        ("a", True),
        ("A.b-c_9", True),
        ("a" * 63, True),
        ("a" * 64, False),
        ("-a", False),
        ("a-", False),
        ("_a", False),
        ("a.", False),
        ("a b", False),
        ("a/b", False),
        ("é", False),
        ("a\n", False),
        ("\u0661", False),  # ARABIC-INDIC DIGIT ONE: not an ASCII digit
    ],
)
def test_is_valid_label_value(value: str, valid: bool) -> None:
    assert is_valid_label_value(value) is valid


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice", "alice"),
        ("Alice.Smith_2", "Alice.Smith_2"),
        ("alice@example.com", "alice-example.com"),
        ("john doe", "john-doe"),
        ("a  |  b", "a-b"),
        ("--x--", "x"),
        ("_.x._", "x"),
        ("ärger", "rger"),
        ("ü", None),
        ("@@@", None),
        ("", None),
        ("---", None),
        ("a" * 100, "a" * 63),
        ("a" * 62 + "-b", "a" * 62),
        ("DOMAIN\\user", "DOMAIN-user"),
        ("a\nb", "a-b"),
    ],
)
def test_sanitize_label_value(value: str, expected: str | None) -> None:
    assert sanitize_label_value(value) == expected


@given(st.text())
def test_sanitized_label_is_always_valid_or_none(value: str) -> None:
    result = sanitize_label_value(value)
    assert result is None or (result != "" and is_valid_label_value(result))
    if result is not None:
        assert sanitize_label_value(result) == result
    if value and is_valid_label_value(value):
        assert result == value


@given(st.text())
def test_id_label_value_is_always_valid(value: str) -> None:
    result = id_label_value(value)
    assert result and is_valid_label_value(result)
    assert id_label_value(result) == result


def test_id_label_value_keeps_valid_ids_and_separates_others() -> None:
    assert id_label_value("c0ffee-42") == "c0ffee-42"
    spaced, dashed = id_label_value("a b"), id_label_value("a-b")
    assert dashed == "a-b"
    assert spaced != dashed and spaced.startswith("a-b-")
    assert id_label_value("@") != id_label_value("#")
    assert id_label_value("x" * 64) != id_label_value("x" * 65)
    assert len(id_label_value("x" * 200)) <= 63
    assert is_valid_label_value(id_label_value("\udc80"))


# --------------------------------------------------------------------------
# Selectors


def test_label_selector() -> None:
    assert label_selector(app="x") == "app=x"
    assert label_selector({"a.b/c": "1"}, d="2") == "a.b/c=1,d=2"
    assert label_selector() == ""


@pytest.mark.parametrize(
    "labels",
    [
        {"app": "x,other=y"},
        {"app": "x y"},
        {"app": "-x"},
        {"app": "a" * 64},
        {"a,b": "x"},
        {"/x": "y"},
        {"Bad_Prefix/x": "y"},
        {"": "x"},
        {"a=b": "x"},
    ],
)
def test_label_selector_rejects_injection(labels: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        label_selector(labels)


def test_managed_selector() -> None:
    assert managed_selector() == "app.kubernetes.io/managed-by=kuberun"
    assert managed_selector("c1") == (
        "app.kubernetes.io/managed-by=kuberun,kuberun.io/connection-id=c1"
    )
    assert managed_selector(gateway="gw-7") == (
        "app.kubernetes.io/managed-by=kuberun,kuberun.io/gateway=gw-7"
    )
    weird = managed_selector("conn id/1", "gw 2")
    assert f"kuberun.io/connection-id={id_label_value('conn id/1')}" in weird
    assert f"kuberun.io/gateway={id_label_value('gw 2')}" in weird


def selector_matches(selector: str, labels: dict[str, str]) -> bool:
    pairs = [term.split("=", 1) for term in selector.split(",")]
    return all(labels.get(k) == v for k, v in pairs)


@given(connection_id=st.text(min_size=1), gateway=st.text(min_size=1))
@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=50)
def test_managed_selector_matches_the_built_pod(connection_id: str, gateway: str) -> None:
    pod = build_pod(PodConfig(), connection_id=connection_id, username="u", gateway=gateway)
    labels = pod["metadata"]["labels"]
    assert selector_matches(managed_selector(connection_id, gateway), labels)
    assert selector_matches(managed_selector(connection_id), labels)
    assert not selector_matches(managed_selector(connection_id + "x"), labels)


# --------------------------------------------------------------------------
# The Pod


def template() -> PodConfig:
    return config_from_dict(
        {
            "pod": {
                "metadata": {
                    "generateName": "dev-",
                    "labels": {"team": "a", LABEL_USERNAME: "spoofed"},
                    "annotations": {"note": "kept"},
                    "ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "n", "uid": "1"}],
                },
                "spec": {
                    "containers": [
                        {"name": "sidecar", "image": "s", "command": ["side"]},
                        {
                            "name": "shell",
                            "image": "img",
                            "command": ["/entry"],
                            "args": ["--x"],
                            "stdin": True,
                            "tty": True,
                            "env": [{"name": "A", "value": "1"}],
                        },
                    ],
                    "terminationGracePeriodSeconds": 5,
                },
                "idle_command": ["/idle", "forever"],
            }
        }
    ).pod


def test_build_pod() -> None:
    cfg = template()
    before = json.dumps([cfg.metadata, cfg.spec], sort_keys=True)
    pod = build_pod(
        cfg,
        connection_id="c-123",
        username="Alice Smith",
        client_address="[2001:db8::1]:50000",
        gateway="gw-1",
        owner={"apiVersion": "v1", "kind": "Pod", "name": "gateway-0", "uid": "u-1", "x": "y"},
        session_id="7",
    )
    assert json.dumps([cfg.metadata, cfg.spec], sort_keys=True) == before  # not modified
    assert pod["apiVersion"] == "v1" and pod["kind"] == "Pod"
    meta = pod["metadata"]
    assert meta["generateName"] == "dev-"
    assert meta["labels"] == {
        "team": "a",
        LABEL_MANAGED_BY: "kuberun",
        LABEL_CONNECTION_ID: "c-123",
        LABEL_SESSION_ID: "7",
        LABEL_GATEWAY: "gw-1",
        LABEL_USERNAME: "Alice-Smith",
    }
    assert meta["annotations"] == {
        "note": "kept",
        ANNOTATION_USERNAME: "Alice Smith",
        ANNOTATION_CLIENT_ADDRESS: "[2001:db8::1]:50000",
    }
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "X", "name": "n", "uid": "1"},
        {"apiVersion": "v1", "kind": "Pod", "name": "gateway-0", "uid": "u-1"},
    ]
    sidecar, shell = pod["spec"]["containers"]
    assert sidecar == {"name": "sidecar", "image": "s", "command": ["side"]}
    assert shell["command"] == ["/idle", "forever"]
    assert "args" not in shell
    assert shell["stdin"] is False and shell["tty"] is False
    assert shell["env"] == [{"name": "A", "value": "1"}]
    assert pod["spec"]["terminationGracePeriodSeconds"] == 5
    json.dumps(pod)  # serialisable as is


def test_build_pod_defaults() -> None:
    pod = build_pod(PodConfig(), connection_id="c", username="bob")
    meta = pod["metadata"]
    assert meta["generateName"] == "kuberun-"
    assert meta["labels"] == {
        LABEL_MANAGED_BY: "kuberun",
        LABEL_CONNECTION_ID: "c",
        LABEL_USERNAME: "bob",
    }
    assert meta["annotations"] == {ANNOTATION_USERNAME: "bob"}
    assert "ownerReferences" not in meta
    assert pod["spec"]["containers"][0]["command"] == list(PodConfig().idle_command)
    assert "terminationGracePeriodSeconds" not in pod["spec"]


def test_unusable_username_is_omitted_and_template_claim_removed() -> None:
    pod = build_pod(template(), connection_id="c", username="@@@")
    assert LABEL_USERNAME not in pod["metadata"]["labels"]
    assert pod["metadata"]["annotations"][ANNOTATION_USERNAME] == "@@@"


def test_template_without_labels_or_annotations() -> None:
    cfg = config_from_dict({"pod": {"metadata": {"name": "fixed"}}}).pod
    pod = build_pod(cfg, connection_id="c", username="u")
    assert pod["metadata"]["name"] == "fixed"
    assert pod["metadata"]["labels"][LABEL_MANAGED_BY] == "kuberun"


def test_hostile_username_and_connection_id_stay_valid() -> None:
    pod = build_pod(PodConfig(), connection_id="x,y=z", username='"; rm -rf / #' + "x" * 100)
    labels = pod["metadata"]["labels"]
    assert all(is_valid_label_value(v) for v in labels.values())
    assert labels[LABEL_CONNECTION_ID] == id_label_value("x,y=z")


@pytest.mark.parametrize(
    ("username", "kept"),
    [("alice", True), ("a1-b2", True), ("9lives", True), ("x" * 40, True)],
)
def test_dns_safe_username_keeps_valid_names(username: str, kept: bool) -> None:
    assert (dns_safe_username(username) == username) is kept


@pytest.mark.parametrize(
    ("username", "slug"),
    [
        ("Alice", "alice"),
        ("jane.doe@example.org", "jane-doe-example-org"),
        ("a--b", "a-b"),
        ("-x-", "x"),
        ("@@@", "u"),
        ("", "u"),
        ("x" * 41, "x" * 29),
        ("名前", "u"),
    ],
)
def test_dns_safe_username_hashes_the_others(username: str, slug: str) -> None:
    safe = dns_safe_username(username)
    assert safe.startswith(slug + "---")
    assert len(safe) == len(slug) + 11 and len(safe) <= 40
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", safe)


@given(st.text(max_size=80), st.text(max_size=80))
def test_dns_safe_username_is_a_valid_label_and_keeps_names_apart(a: str, b: str) -> None:
    safe_a, safe_b = dns_safe_username(a), dns_safe_username(b)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", safe_a) and len(safe_a) <= 40
    if a != b:
        assert safe_a != safe_b


def test_username_placeholder_in_string_values_only() -> None:
    cfg = config_from_dict(
        {
            "pod": {
                "metadata": {
                    "generateName": "ws-{username}-",
                    "labels": {"owner": "{username}", "{username}": "key-kept"},
                    "annotations": {"literal": "{user} {{username}} {username!r}"},
                },
                "spec": {
                    "containers": [
                        {
                            "name": "shell",
                            "image": "img",
                            "env": [{"name": "HOME_CLAIM", "value": "home-{username}"}],
                        }
                    ],
                    "volumes": [
                        {"name": "home", "persistentVolumeClaim": {"claimName": "home-{username}"}}
                    ],
                    "terminationGracePeriodSeconds": 5,
                    "nodeSelector": {"pool": "{username}"},
                },
            }
        }
    ).pod
    pod = build_pod(cfg, connection_id="c", username="Jane.Doe")
    safe = dns_safe_username("Jane.Doe")
    meta, spec = pod["metadata"], pod["spec"]
    assert meta["generateName"] == f"ws-{safe}-"
    assert meta["labels"]["owner"] == safe
    assert meta["labels"]["{username}"] == "key-kept"  # keys are never substituted
    # Only the exact placeholder: no format specs, no escapes, nothing parsed.
    assert meta["annotations"]["literal"] == "{user} {" + safe + "} {username!r}"
    assert spec["containers"][0]["env"] == [{"name": "HOME_CLAIM", "value": f"home-{safe}"}]
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == f"home-{safe}"
    assert spec["terminationGracePeriodSeconds"] == 5
    assert spec["nodeSelector"] == {"pool": safe}
    # The raw username still goes only in the annotation kuberun writes.
    assert meta["annotations"][ANNOTATION_USERNAME] == "Jane.Doe"
    assert "{username}" in json.dumps(cfg.spec)  # the template itself is not modified


def test_username_placeholder_cannot_inject_structure() -> None:
    cfg = config_from_dict({"pod": {"metadata": {"name": "ws-{username}"}}}).pod
    for hostile in ('a", "b": "c', "x\nkind: Secret", "$(rm -rf /)", "{username}"):
        pod = build_pod(cfg, connection_id="c", username=hostile)
        name = pod["metadata"]["name"]
        assert re.fullmatch(r"ws-[a-z0-9]([-a-z0-9]*[a-z0-9])?", name), name


def test_build_pod_without_console_container() -> None:
    cfg = PodConfig()
    object.__setattr__(cfg, "console_container", "missing")
    with pytest.raises(ConfigError) as info:
        build_pod(cfg, connection_id="c", username="u")
    assert info.value.path == "pod.console_container"


def test_incomplete_owner_is_rejected() -> None:
    with pytest.raises(ValueError, match="uid"):
        build_pod(
            PodConfig(),
            connection_id="c",
            username="u",
            owner={"apiVersion": "v1", "kind": "Pod", "name": "g"},
        )


# --------------------------------------------------------------------------
# Env names and patterns


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("LANG", True),
        ("_x1", True),
        ("lc_all", True),
        ("1A", False),
        ("", False),
        ("A-B", False),
        ("A=B", False),
        ("A B", False),
        ("É", False),
        ("A\n", False),
    ],
)
def test_valid_env_name(name: str, valid: bool) -> None:
    assert valid_env_name(name) is valid


@pytest.mark.parametrize(
    ("name", "patterns", "allowed"),
    [
        ("LANG", ["LANG", "LC_*"], True),
        ("LC_ALL", ["LANG", "LC_*"], True),
        ("LC_", ["LC_*"], True),
        ("LANGUAGE", ["LANG"], False),
        ("lang", ["LANG"], False),
        ("GIT_A", ["GIT_?"], True),
        ("GIT_AB", ["GIT_?"], False),
        ("ANY", ["*"], True),
        ("ANY", [], False),
        ("LC-X", ["LC*"], False),
        ("A[B", ["*"], False),
    ],
)
def test_env_allowed(name: str, patterns: list[str], allowed: bool) -> None:
    assert env_allowed(name, patterns) is allowed


# --------------------------------------------------------------------------
# exec and the wrapper


def test_exec_argv_is_opensshs() -> None:
    assert exec_argv("echo hi; exit 3") == ["/bin/sh", "-c", "echo hi; exit 3"]
    assert exec_argv("") == ["/bin/sh", "-c", ""]
    with pytest.raises(ValueError):
        exec_argv("a\0b")


def test_exec_argv_runs_like_openssh() -> None:
    result = run(exec_argv("echo hi; echo err >&2; exit 3"))
    assert (result.returncode, result.stdout, result.stderr) == (3, b"hi\n", b"err\n")


def test_wrap_without_env_or_pid_file_is_identity() -> None:
    assert wrap_command(["/bin/ls", "-l"]) == ["/bin/ls", "-l"]
    assert wrap_command(("/bin/ls",), env={}) == ["/bin/ls"]


def test_wrap_shape() -> None:
    argv = wrap_command(["prog", "arg"], env={"A": "1", "B": "x y"}, pid_file="/tmp/p")
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["kuberun", "/tmp/p", "A=1", "B=x y", "--", "prog", "arg"]
    argv = wrap_command(["prog"], env={"A": "1"})
    assert argv[3:] == ["kuberun", "", "A=1", "--", "prog"]


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"argv": []}, "empty argv"),
        ({"argv": ["a\0"]}, "NUL"),
        ({"argv": ["p"], "env": {"A-B": "x"}}, "invalid environment variable name"),
        ({"argv": ["p"], "env": {"": "x"}}, "invalid environment variable name"),
        ({"argv": ["p"], "env": {"A=B": "x"}}, "invalid environment variable name"),
        ({"argv": ["p"], "env": {"A": "x\0y"}}, "NUL"),
        ({"argv": ["p"], "pid_file": "/t\0"}, "NUL"),
    ],
)
def test_wrap_rejects(kwargs: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        wrap_command(**kwargs)


HOSTILE = {
    "QUOTES": 'it\'s "quoted" \\ back\\slash',
    "SUBST": "$(touch {marker})",
    "BACKTICKS": "`touch {marker}`",
    "NEWLINES": "line1\nline2\n\nexport X=1; touch {marker}\n",
    "SEMI": "; touch {marker}; echo",
    "SPACES": "  leading and trailing  ",
    "UNICODE": "žluťoučký kůň 🐎 ٣ \u200b",
    "EMPTY": "",
    "GLOB": "* ? [a-z] ~",
    "VARS": "$HOME ${PATH} $1 $@ $$",
    "EQUALS": "a=b=c",
    "DASHES": "-- -n -e",
    "CR": "a\rb",
    "CONTROL": "\x01\x1b[31m\x7f",
}


def print_env_program(names: Sequence[str]) -> list[str]:
    code = (
        "import json, os, sys; "
        "sys.stdout.write(json.dumps({k: os.environ.get(k) for k in sys.argv[1:]}))"
    )
    return [sys.executable, "-c", code, *names]


@pytest.mark.parametrize("shell", SHELLS)
def test_wrapper_exports_hostile_values_byte_exact(shell: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    env = {k: v.replace("{marker}", str(marker)) for k, v in HOSTILE.items()}
    argv = wrap_command(print_env_program(sorted(env)), env=env)
    result = run(shell_argv(shell, argv), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    assert json.loads(result.stdout) == env
    assert not marker.exists()
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_wrapper_values_via_printf(shell: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for value in HOSTILE.values():
        value = value.replace("{marker}", str(marker))
        argv = wrap_command(["/bin/sh", "-c", 'printf %s "$V"'], env={"V": value, "TERM": "xterm"})
        result = run(shell_argv(shell, argv), cwd=tmp_path)
        assert result.stdout == value.encode(), value
    assert not marker.exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_wrapper_cannot_be_steered_by_env_names(shell: str, tmp_path: Path) -> None:
    # Names the script could have used itself, and ones shells treat specially.
    env = {
        "n": "0",
        "p": str(tmp_path / "elsewhere"),
        "IFS": "-",
        "OPTIND": "3",
        "A": "after-the-tricky-ones",
    }
    pid_file = tmp_path / "pid"
    argv = wrap_command(print_env_program(sorted(env)), env=env, pid_file=str(pid_file))
    result = run(shell_argv(shell, argv), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == env
    assert pid_file.exists()
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("shell", SHELLS)
def test_argv_after_env_is_passed_verbatim(shell: str, tmp_path: Path) -> None:
    program_args = ["--", "A=B", "", " x ", "$(id)", "-n", "a\nb"]
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    argv = wrap_command([sys.executable, "-c", code, *program_args], env={"X": "--"})
    result = run(shell_argv(shell, argv), cwd=tmp_path)
    assert json.loads(result.stdout) == program_args


def run_on_a_pty(
    argv: list[str], size: tuple[int, int] | None = None, path: str | None = None
) -> bytes:
    """Run ``argv`` with a new pty as stdin, stdout and stderr (``size`` rows, columns
    set on it first, else the 0x0 a new pty has); everything it wrote there."""
    master, slave = pty.openpty()
    try:
        if size is not None:
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
        env = {"PATH": path if path is not None else os.environ.get("PATH", "/usr/bin:/bin")}
        proc = subprocess.Popen(
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every writer has closed the pty
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=20) == 0, out
        return out
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.parametrize("shell", SHELLS)
def test_pty_wrapper_gives_a_sizeless_terminal_the_clients_size(shell: str) -> None:
    # What a real node can do: the program starts before the first resize message lands.
    argv = wrap_command(["stty", "size"], env={"TERM": "xterm"}, term_size=(100, 40))
    assert run_on_a_pty(shell_argv(shell, argv)) == b"40 100\r\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_pty_wrapper_keeps_a_size_already_applied(shell: str) -> None:
    # The runtime applied a resize first (perhaps a newer size than the request's).
    argv = wrap_command(["stty", "size"], term_size=(100, 40))
    assert run_on_a_pty(shell_argv(shell, argv), size=(50, 120)) == b"50 120\r\n"


@pytest.mark.parametrize("shell", SHELLS)
def test_pty_wrapper_without_stty_runs_the_program(shell: str, tmp_path: Path) -> None:
    code = "import os; print('ran', os.get_terminal_size(0))"
    argv = wrap_command([sys.executable, "-c", code], term_size=(100, 40))
    out = run_on_a_pty(shell_argv(shell, argv), path=str(tmp_path))
    assert out == b"ran os.terminal_size(columns=0, lines=0)\r\n"


@pytest.mark.parametrize("size", [(0, 40), (100, -1), (True, 40), (1.5, 2)])
def test_wrap_rejects_a_bad_terminal_size(size: Any) -> None:
    with pytest.raises(ValueError, match="invalid terminal size"):
        wrap_command(["p"], term_size=size)


@pytest.mark.parametrize("shell", SHELLS)
def test_pid_file_holds_the_programs_group(shell: str, tmp_path: Path) -> None:
    # Run as an exec is by runc, crun and devcluster: in a session of its own.
    pid_file = tmp_path / "p.pid"
    argv = wrap_command(["/bin/sh", "-c", "echo $$"], pid_file=str(pid_file))
    result = run(shell_argv(shell, argv), start_new_session=True)
    assert result.returncode == 0, result.stderr
    assert pid_file.read_text() == "-" + result.stdout.decode()
    assert int(result.stdout) > 1


def test_pid_file_matches_the_process_id(tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    argv = wrap_command(["sleep", "30"], env={"A": "1"}, pid_file=str(pid_file))
    proc = subprocess.Popen(argv, start_new_session=True)
    try:
        wait_for(pid_file.exists)
        wait_for(lambda: pid_file.read_text().endswith("\n"))
        assert pid_file.read_text() == f"-{proc.pid}\n"
    finally:
        proc.kill()
        proc.wait()


#: Shells whose job control needs a terminal: in an exec that does not lead its
#: process group they can only record the program's PID.
NO_JOB_CONTROL_WITHOUT_TTY = ("dash", "busybox")


def process_group(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[2])


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it runs no more)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("shell", SHELLS)
def test_not_a_group_leader_gets_a_group_where_the_shell_can(shell: str, tmp_path: Path) -> None:
    # An exec that shares its parent's process group, without a terminal.
    pid_file = tmp_path / "p.pid"
    out = tmp_path / "out"
    argv = wrap_command(
        ["/bin/sh", "-c", 'echo $$ > "$0"; read x; echo "$x"', str(out)],
        env={"A": "1"},
        pid_file=str(pid_file),
    )
    proc = subprocess.Popen(
        shell_argv(shell, argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for(lambda: out.exists() and out.read_text().endswith("\n"))
        wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
        program = int(out.read_text())
        recorded = pid_file.read_text().strip()
        if os.path.basename(shell) in NO_JOB_CONTROL_WITHOUT_TTY:
            assert recorded == str(proc.pid) == str(program)
        else:
            # The program runs as a job in a group of its own; stdin still reaches it.
            assert recorded == f"-{program}"
            assert program != proc.pid and process_group(program) == program
            assert process_group(proc.pid) == os.getpgrp()
        stdout, stderr = proc.communicate(b"typed\n", timeout=10)
        assert (proc.returncode, stdout, stderr) == (0, b"typed\n", b"")
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("leader", [True, False], ids=["own-session", "shared-group"])
@pytest.mark.parametrize(
    "program",
    ['sleep 30 & echo $! > "$0"; wait', 'sh -c \'echo $$ > "$0"; exec sleep 30\' "$0"; echo after'],
    ids=["background-job", "child-then-more"],
)
def test_signals_reach_what_the_program_started(
    shell: str, leader: bool, program: str, tmp_path: Path
) -> None:
    pid_file = tmp_path / "p.pid"
    child_file = tmp_path / "child"
    argv = wrap_command(["/bin/sh", "-c", program, str(child_file)], pid_file=str(pid_file))
    proc = subprocess.Popen(
        shell_argv(shell, argv), stdout=subprocess.PIPE, start_new_session=leader
    )
    try:
        wait_for(lambda: child_file.exists() and child_file.read_text().endswith("\n"))
        wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
        child = int(child_file.read_text())
        result = run(shell_argv(shell, kill_argv("TERM", str(pid_file))))
        assert result.returncode == 0, result.stderr
        if not leader and os.path.basename(shell) in NO_JOB_CONTROL_WITHOUT_TTY:
            # Documented limit: only the program itself is signalled.
            assert proc.wait(timeout=10) == -signal.SIGTERM
            assert not gone(child)
            os.kill(child, signal.SIGKILL)
            return
        status = proc.wait(timeout=10)
        # Killed by the signal when exec'd; a job's status (128+N) through the shell.
        assert status in (-signal.SIGTERM, 128 + signal.SIGTERM)
        assert proc.stdout is not None and proc.stdout.read() == b""  # no "after"
        wait_for(lambda: gone(child))
    finally:
        if leader:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()


def test_unwritable_pid_file_does_not_stop_the_program(tmp_path: Path) -> None:
    argv = wrap_command(["/bin/sh", "-c", "echo ran"], pid_file=str(tmp_path / "no" / "such"))
    result = run(argv)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ran\n", b"")


def test_missing_program_exits_127() -> None:
    result = run(wrap_command(["/no/such/program"], env={"A": "1"}))
    assert result.returncode == 127
    assert b"kuberun" in result.stderr or b"no/such" in result.stderr


@given(
    env=st.dictionaries(
        # A fixed prefix keeps clear of names the shell or Python act on.
        st.from_regex(r"KR_[A-Za-z0-9_]{0,8}", fullmatch=True),
        st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0")),
        max_size=5,
    )
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_wrapper_roundtrip_property(env: dict[str, str]) -> None:
    result = run(wrap_command(print_env_program(sorted(env)), env=env))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == env


# --------------------------------------------------------------------------
# Signals


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.01)


def test_kill_argv_shape() -> None:
    argv = kill_argv("TERM", "/tmp/x.pid")
    assert argv[:2] == ["/bin/sh", "-c"]
    assert argv[3:] == ["kuberun", "TERM", "/tmp/x.pid"]
    assert "/tmp/x.pid" not in argv[2] and "TERM" not in argv[2]


@pytest.mark.parametrize("name", ["SIGTERM", "term", "TERM ", "9", "", "STOP", "$(id)", "CHLD"])
def test_kill_argv_rejects_unknown_signals(name: str) -> None:
    with pytest.raises(ValueError, match="unknown signal"):
        kill_argv(name, "/tmp/x")


def test_signal_names_are_rfc4254s() -> None:
    assert {
        "ABRT",
        "ALRM",
        "FPE",
        "HUP",
        "ILL",
        "INT",
        "KILL",
        "PIPE",
        "QUIT",
        "SEGV",
        "TERM",
        "USR1",
        "USR2",
    } == SIGNAL_NAMES


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("name", ["TERM", "USR1", "INT", "KILL", "HUP"])
def test_kill_delivers_the_signal(shell: str, name: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    proc = subprocess.Popen(
        wrap_command(["sleep", "30"], pid_file=str(pid_file)), start_new_session=True
    )
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
        result = run(shell_argv(shell, kill_argv(name, str(pid_file))))
        assert result.returncode == 0, result.stderr
        assert proc.wait(timeout=10) == -getattr(signal, f"SIG{name}")
    finally:
        proc.kill()
        proc.wait()


def spy_kill(argv: list[str]) -> list[str]:
    """``argv`` with ``kill`` replaced by a function that only reports its arguments."""
    return [argv[0], argv[1], 'kill() { echo "KILL $*"; }; ' + argv[2], *argv[3:]]


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "content",
    [
        "-1\n",
        "0\n",
        "1\n",
        "01\n",
        "\n",
        "",
        "12 34\n",
        "$(id)\n",
        "-9 1\n",
        "1e3\n",
        "-\n",
        "-0\n",
        "-012\n",
        "--12\n",
        "12-\n",
        "1-2\n",
        "-l\n",
    ],
)
def test_kill_refuses_implausible_pids(shell: str, content: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    pid_file.write_text(content)
    result = run(shell_argv(shell, spy_kill(kill_argv("TERM", str(pid_file)))))
    assert result.returncode != 0
    assert b"KILL" not in result.stdout


@pytest.mark.parametrize("shell", SHELLS)
def test_kill_passes_a_plausible_pid(shell: str, tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    pid_file.write_text("4242\n")
    result = run(shell_argv(shell, spy_kill(kill_argv("USR1", str(pid_file)))))
    assert result.stdout == b"KILL -USR1 4242\n"
    pid_file.write_text("-4242\n")
    result = run(shell_argv(shell, spy_kill(kill_argv("TERM", str(pid_file)))))
    assert result.stdout == b"KILL -TERM -4242\n"


def test_kill_with_missing_pid_file_fails_quietly_enough(tmp_path: Path) -> None:
    result = run(kill_argv("TERM", str(tmp_path / "absent")))
    assert result.returncode != 0


def test_kill_of_a_finished_process_fails(tmp_path: Path) -> None:
    pid_file = tmp_path / "p.pid"
    result = run(wrap_command(["/bin/sh", "-c", "exit 0"], pid_file=str(pid_file)))
    assert result.returncode == 0
    assert run(kill_argv("TERM", str(pid_file))).returncode != 0


# --------------------------------------------------------------------------
# PID file paths


def test_pid_file_path() -> None:
    assert pid_file_path("/tmp", "c1", "3") == "/tmp/kuberun-c1-3.pid"
    assert pid_file_path("/tmp/", "c1", "3") == "/tmp/kuberun-c1-3.pid"
    assert pid_file_path("/", "c1", "3") == "/kuberun-c1-3.pid"


@given(st.text(), st.text())
def test_pid_file_path_stays_in_its_directory(connection_id: str, channel_id: str) -> None:
    path = pid_file_path("/run/kuberun", connection_id, channel_id)
    directory, _, name = path.rpartition("/")
    assert directory == "/run/kuberun"
    assert name.startswith("kuberun-") and name.endswith(".pid")
    assert "\0" not in name and len(name) < 200


def test_pid_file_paths_of_distinct_ids_differ() -> None:
    assert pid_file_path("/t", "a/b", "1") != pid_file_path("/t", "a-b", "1")
    assert pid_file_path("/t", "../x", "1") != pid_file_path("/t", "x", "1")
    assert "/.." not in pid_file_path("/t", "../../etc/passwd", "1")


@pytest.mark.parametrize("shell", SHELLS)
def test_relative_pid_file_lives_in_tmpdir(shell: str, tmp_path: Path) -> None:
    # pod.pid_dir null: the PID file goes to the container's $TMPDIR (devcluster
    # gives each Pod its own), else /tmp; a TMPDIR among the user's env words
    # does not move it, as the file is written before any export.
    name = pid_file_path(None, "c1", "s1")
    assert name == "kuberun-c1-s1.pid"
    argv = wrap_command(["sleep", "30"], env={"TMPDIR": str(tmp_path / "elsewhere")}, pid_file=name)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp_path)}
    # Started as runc, crun and devcluster start an exec: in a session of its own.
    proc = subprocess.Popen(shell_argv(shell, argv), env=env, start_new_session=True)
    try:
        pid_file = tmp_path / name
        wait_for(lambda: pid_file.exists() and pid_file.read_text().endswith("\n"))
        assert (tmp_path / name).read_text() == f"-{proc.pid}\n"
        killed = subprocess.run(
            shell_argv(shell, kill_argv("TERM", name)), env=env, timeout=20, check=False
        )
        assert killed.returncode == 0
        assert proc.wait(20) == -15
    finally:
        proc.kill()
        proc.wait()
