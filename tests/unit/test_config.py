"""Tests of kuberun.config: defaults, strictness, YAML loading, error paths."""

from __future__ import annotations

import dataclasses
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kuberun.config import (
    DEFAULT_CIPHERS,
    DEFAULT_IDLE_COMMAND,
    Config,
    KubernetesConfig,
    PodConfig,
    SSHConfig,
    TimeoutsConfig,
    config_from_dict,
    load_config,
    parse_listen,
)
from kuberun.errors import ConfigError


def error_for(data: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return info.value


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


# --------------------------------------------------------------------------
# Defaults


def test_defaults_match_the_documented_schema() -> None:
    cfg = config_from_dict(None)
    assert cfg == config_from_dict({}) == Config()
    assert cfg.ssh.listen == "0.0.0.0:2222"
    assert cfg.ssh.host_keys == ("/etc/kuberun/ssh_host_ed25519_key",)
    assert cfg.ssh.authorized_keys is None
    assert cfg.ssh.accept_env == ("LANG", "LC_*")
    assert cfg.ssh.max_sessions == 10
    assert cfg.ssh.max_startups == 100
    assert cfg.ssh.login_grace_time == 120
    assert cfg.ssh.ciphers is None
    assert cfg.ssh.effective_ciphers == DEFAULT_CIPHERS
    assert cfg.ssh.effective_ciphers[0] == "aes128-gcm@openssh.com"
    assert cfg.ssh.banner is None
    assert cfg.ssh.server_version == "OpenSSH_9.9 kuberun"
    assert cfg.kubernetes == KubernetesConfig(None, None, "default", True, 30.0)
    assert cfg.pod.mode == "connection"
    assert cfg.pod.metadata == {"generateName": "kuberun-", "labels": {}, "annotations": {}}
    assert cfg.pod.spec == {"containers": [{"name": "shell", "image": "debian:stable-slim"}]}
    assert cfg.pod.console_container == "shell"
    assert cfg.pod.idle_command == (
        "/bin/sh",
        "-c",
        "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done",
    )
    assert cfg.pod.idle_command == DEFAULT_IDLE_COMMAND
    assert cfg.pod.shell_command == ("/bin/sh",)
    assert dict(cfg.pod.subsystems) == {"sftp": ("/usr/lib/openssh/sftp-server",)}
    assert cfg.pod.signals is True
    assert cfg.pod.pid_dir is None  # the container's $TMPDIR, else /tmp
    assert cfg.timeouts == TimeoutsConfig(60, 30, 30)
    assert cfg.metrics.listen == "127.0.0.1:9100"
    assert cfg.logging.format == "text"
    assert cfg.logging.level == "INFO"


def test_default_templates_are_not_shared_between_instances() -> None:
    a, b = PodConfig(), PodConfig()
    a.metadata["labels"]["x"] = "y"
    a.spec["containers"].append({"name": "other"})
    assert b.metadata["labels"] == {}
    assert len(b.spec["containers"]) == 1


def test_dataclasses_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.ssh.listen = "x"  # type: ignore[misc]


def test_full_config_is_read() -> None:
    data = {
        "ssh": {
            "listen": "[::1]:2022",
            "host_keys": ["/k1", "/k2"],
            "authorized_keys": "/keys/{username}",
            "accept_env": ["LANG", "LC_*", "GIT_?"],
            "max_sessions": 3,
            "max_startups": 7,
            "login_grace_time": 5.5,
            "ciphers": ["aes256-ctr"],
            "banner": "hello\n",
        },
        "kubernetes": {
            "kubeconfig": "/kc",
            "context": "ctx",
            "namespace": "users",
            "verify_tls": False,
            "ping_interval": 10,
        },
        "pod": {
            "mode": "session",
            "metadata": {"name": "fixed", "labels": {"team": "a"}},
            "spec": {
                "containers": [{"name": "side", "image": "x"}, {"name": "main", "image": "y"}],
                "restartPolicy": "Never",
            },
            "console_container": "main",
            "idle_command": ["/pause"],
            "shell_command": ["/bin/bash", "-l"],
            "subsystems": {"sftp": ["/sftp-server", "-l", "INFO"], "x": ["/x"]},
            "signals": False,
            "pid_dir": "/run",
        },
        "timeouts": {"pod_start": 1, "pod_stop": 2.5, "command_start": 3},
        "metrics": {"listen": None},
        "logging": {"format": "json", "level": "debug"},
    }
    cfg = config_from_dict(data)
    assert cfg.ssh.listen_address == ("::1", 2022)
    assert cfg.ssh.host_keys == ("/k1", "/k2")
    assert cfg.ssh.accept_env == ("LANG", "LC_*", "GIT_?")
    assert cfg.ssh.effective_ciphers == ("aes256-ctr",)
    assert cfg.ssh.login_grace_time == 5.5
    assert cfg.ssh.banner == "hello\n"
    assert cfg.kubernetes == KubernetesConfig("/kc", "ctx", "users", False, 10.0)
    assert cfg.pod.mode == "session"
    assert cfg.pod.console()["image"] == "y"
    assert cfg.pod.idle_command == ("/pause",)
    assert cfg.pod.shell_command == ("/bin/bash", "-l")
    assert cfg.pod.subsystems["sftp"] == ("/sftp-server", "-l", "INFO")
    assert cfg.pod.signals is False
    assert cfg.pod.pid_dir == "/run"
    assert cfg.timeouts == TimeoutsConfig(1.0, 2.5, 3.0)
    assert cfg.metrics.listen is None
    assert cfg.logging.format == "json"
    assert cfg.logging.level == "DEBUG"


def test_input_is_copied_not_referenced() -> None:
    spec = {"containers": [{"name": "shell", "image": "a"}]}
    data = {"pod": {"spec": spec}}
    cfg = config_from_dict(data)
    spec["containers"][0]["image"] = "changed"
    assert cfg.pod.spec["containers"][0]["image"] == "a"


def test_partial_sections_keep_other_defaults() -> None:
    cfg = config_from_dict({"ssh": {"max_sessions": 2}, "timeouts": {"pod_stop": 9}})
    assert cfg.ssh.max_sessions == 2
    assert cfg.ssh.listen == "0.0.0.0:2222"
    assert cfg.timeouts == TimeoutsConfig(60, 9, 30)


def test_null_sections_mean_defaults() -> None:
    assert config_from_dict({"ssh": None, "pod": None}) == Config()


def test_empty_subsystems_is_allowed() -> None:
    assert dict(config_from_dict({"pod": {"subsystems": {}}}).pod.subsystems) == {}


def test_accept_env_may_be_empty() -> None:
    assert config_from_dict({"ssh": {"accept_env": []}}).ssh.accept_env == ()


# --------------------------------------------------------------------------
# Unknown and misplaced keys


@pytest.mark.parametrize(
    ("data", "path", "hint"),
    [
        ({"pod": {"spek": {}}}, "pod.spek", "did you mean 'spec'?"),
        ({"sssh": {}}, "sssh", "did you mean 'ssh'?"),
        ({"ssh": {"namespace": "x"}}, "ssh.namespace", "'kubernetes.namespace'"),
        ({"listen": "x"}, "listen", "'ssh.listen' or 'metrics.listen'"),
        ({"pod": {"idleCommand": ["a"]}}, "pod.idleCommand", "'idle_command'? keys are snake_case"),
        ({"pod": {"containers": []}}, "pod.containers", "'pod.spec.containers'"),
        ({"pod": {"labels": {}}}, "pod.labels", "'pod.metadata.labels'"),
        ({"pod": {"image": "x"}}, "pod.image", "pod.spec.containers"),
        ({"pod": {"namespace": "x"}}, "pod.namespace", "kubernetes.namespace"),
        ({"pod": {"podSpec": {}}}, "pod.podSpec", "'spec'"),
        ({"kubernetes": {"pod_start": 3}}, "kubernetes.pod_start", "'timeouts.pod_start'"),
        ({"timeouts": {"podStart": 3}}, "timeouts.podStart", "'pod_start'"),
        ({"ssh": {"pod": {}}}, "ssh.pod", "did you mean 'pod'?"),
        ({"metrics": {"zzz": 1}}, "metrics.zzz", "unknown key"),
    ],
)
def test_unknown_keys_name_the_full_path_with_a_hint(data: Any, path: str, hint: str) -> None:
    err = error_for(data)
    assert err.path == path
    assert "unknown key" in str(err)
    assert hint in str(err)
    assert str(err).startswith(f"{path}: ")


def test_unknown_key_without_a_hint() -> None:
    err = error_for({"ssh": {"qqqqqqqq": 1}})
    assert str(err) == "ssh.qqqqqqqq: unknown key"


def test_non_string_key_is_rejected() -> None:
    err = error_for({"ssh": {1: 2}})
    assert err.path == "ssh"
    assert "keys must be strings" in str(err)


def test_top_level_must_be_a_mapping() -> None:
    assert "expected a mapping" in str(error_for(["ssh"]))


def test_section_must_be_a_mapping() -> None:
    err = error_for({"pod": ["x"]})
    assert err.path == "pod"
    assert "expected a mapping" in str(err)


# --------------------------------------------------------------------------
# Types


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"ssh": {"listen": 2222}}, "ssh.listen", "expected a string, got an integer (2222)"),
        ({"ssh": {"listen": None}}, "ssh.listen", "expected a string, got null"),
        ({"ssh": {"host_keys": "/k"}}, "ssh.host_keys", "expected a list of strings"),
        ({"ssh": {"host_keys": ["/k", 3]}}, "ssh.host_keys[1]", "expected a string"),
        ({"ssh": {"max_sessions": "3"}}, "ssh.max_sessions", "expected an integer"),
        ({"ssh": {"max_sessions": True}}, "ssh.max_sessions", "expected an integer, got a bool"),
        ({"ssh": {"max_sessions": 2.5}}, "ssh.max_sessions", "expected an integer"),
        ({"ssh": {"login_grace_time": "2m"}}, "ssh.login_grace_time", "expected a number"),
        ({"ssh": {"ciphers": "aes256-ctr"}}, "ssh.ciphers", "expected a list of strings"),
        ({"ssh": {"banner": 5}}, "ssh.banner", "expected a string or null"),
        ({"ssh": {"authorized_keys": ["/a"]}}, "ssh.authorized_keys", "a string or null"),
        ({"kubernetes": {"verify_tls": "no"}}, "kubernetes.verify_tls", "expected true or false"),
        ({"kubernetes": {"verify_tls": 0}}, "kubernetes.verify_tls", "expected true or false"),
        ({"kubernetes": {"namespace": None}}, "kubernetes.namespace", "expected a string"),
        ({"kubernetes": {"kubeconfig": 1}}, "kubernetes.kubeconfig", "a string or null"),
        ({"pod": {"metadata": "x"}}, "pod.metadata", "expected a mapping"),
        ({"pod": {"spec": None}}, "pod.spec", "expected a mapping, got null"),
        ({"pod": {"signals": "yes"}}, "pod.signals", "expected true or false"),
        ({"pod": {"idle_command": "sleep 1"}}, "pod.idle_command", "expected a list of strings"),
        ({"pod": {"shell_command": [1]}}, "pod.shell_command[0]", "expected a string"),
        ({"pod": {"subsystems": {"sftp": "/s"}}}, "pod.subsystems.sftp", "a list of strings"),
        ({"pod": {"subsystems": {"sftp": None}}}, "pod.subsystems.sftp", "a list of strings"),
        ({"pod": {"subsystems": ["sftp"]}}, "pod.subsystems", "expected a mapping"),
        ({"pod": {"mode": 1}}, "pod.mode", "expected a string"),
        ({"timeouts": {"pod_start": "60s"}}, "timeouts.pod_start", "expected a number"),
        ({"timeouts": {"pod_stop": None}}, "timeouts.pod_stop", "expected a number, got null"),
        ({"metrics": {"listen": 9100}}, "metrics.listen", "expected a string or null"),
        ({"logging": {"level": 10}}, "logging.level", "expected a string"),
    ],
)
def test_wrong_types_name_path_and_expected_type(data: Any, path: str, expected: str) -> None:
    err = error_for(data)
    assert err.path == path, str(err)
    assert expected in str(err)


def test_integer_seconds_become_floats() -> None:
    cfg = config_from_dict({"timeouts": {"pod_start": 5}})
    assert isinstance(cfg.timeouts.pod_start, float)


# --------------------------------------------------------------------------
# Values


@pytest.mark.parametrize(
    ("data", "path", "problem"),
    [
        ({"timeouts": {"pod_start": 0}}, "timeouts.pod_start", "> 0"),
        ({"timeouts": {"pod_stop": -1}}, "timeouts.pod_stop", "> 0"),
        ({"timeouts": {"command_start": float("inf")}}, "timeouts.command_start", "finite"),
        ({"timeouts": {"command_start": float("nan")}}, "timeouts.command_start", "finite"),
        ({"ssh": {"login_grace_time": 0}}, "ssh.login_grace_time", "> 0"),
        ({"kubernetes": {"ping_interval": 0}}, "kubernetes.ping_interval", "> 0"),
        ({"ssh": {"max_sessions": 0}}, "ssh.max_sessions", "at least 1"),
        ({"ssh": {"max_startups": -5}}, "ssh.max_startups", "at least 1"),
        ({"ssh": {"host_keys": []}}, "ssh.host_keys", "at least one"),
        ({"ssh": {"host_keys": [""]}}, "ssh.host_keys[0]", "non-empty"),
        ({"ssh": {"accept_env": ["LC-*"]}}, "ssh.accept_env[0]", "not a variable name pattern"),
        ({"ssh": {"accept_env": ["[A-Z]*"]}}, "ssh.accept_env[0]", "pattern"),
        ({"ssh": {"accept_env": [""]}}, "ssh.accept_env[0]", "pattern"),
        ({"ssh": {"ciphers": []}}, "ssh.ciphers", "at least one"),
        ({"ssh": {"ciphers": ["aes128-gsm@openssh.com"]}}, "ssh.ciphers[0]", "aes128-gcm"),
        ({"ssh": {"ciphers": ["aes256-ctr", "aes256-ctr"]}}, "ssh.ciphers", "twice"),
        ({"ssh": {"server_version": ""}}, "ssh.server_version", "non-empty"),
        ({"ssh": {"server_version": " kuberun"}}, "ssh.server_version", "non-empty"),
        ({"ssh": {"server_version": "Open-SSH_9"}}, "ssh.server_version", "without '-'"),
        ({"ssh": {"server_version": "x\r\nSSH-2.0-y"}}, "ssh.server_version", "printable ASCII"),
        ({"ssh": {"server_version": "OpenSSH_9.9 ü"}}, "ssh.server_version", "printable ASCII"),
        ({"ssh": {"server_version": "x" * 246}}, "ssh.server_version", "longer than 245"),
        ({"ssh": {"server_version": "OpenSSH_7.4 kuberun"}}, "ssh.server_version", "before 8.0"),
        ({"ssh": {"server_version": "OpenSSH_5"}}, "ssh.server_version", "before 8.0"),
        ({"ssh": {"server_version": 9}}, "ssh.server_version", "expected a string"),
        ({"ssh": {"authorized_keys": "/k/{user}"}}, "ssh.authorized_keys", "'{username}'"),
        ({"ssh": {"authorized_keys": "/k/{username!r}"}}, "ssh.authorized_keys", "{username}"),
        ({"ssh": {"authorized_keys": "/k/{"}}, "ssh.authorized_keys", "literal braces"),
        ({"ssh": {"authorized_keys": ""}}, "ssh.authorized_keys", "empty"),
        ({"kubernetes": {"namespace": "Users"}}, "kubernetes.namespace", "not a valid namespace"),
        ({"kubernetes": {"namespace": "a" * 64}}, "kubernetes.namespace", "63"),
        ({"kubernetes": {"kubeconfig": ""}}, "kubernetes.kubeconfig", "path or null"),
        ({"kubernetes": {"context": ""}}, "kubernetes.context", "context name or null"),
        ({"pod": {"mode": "sesion"}}, "pod.mode", "'connection', 'session'"),
        ({"pod": {"mode": "users"}}, "pod.mode", "'user'"),
        ({"pod": {"idle_timeout": -1}}, "pod.idle_timeout", ">= 0"),
        ({"pod": {"idle_timeout": "30m"}}, "pod.idle_timeout", "expected a number"),
        ({"pod": {"lease_duration": 0}}, "pod.lease_duration", "> 0"),
        ({"pod": {"lease_duration": 0.5}}, "pod.lease_duration", "at least 1 second"),
        (
            {"pod": {"mode": "user", "metadata": {"name": "shared"}}},
            "pod.metadata.name",
            "'{username}'",
        ),
        ({"pod": {"idle_command": []}}, "pod.idle_command", "non-empty"),
        ({"pod": {"shell_command": [""]}}, "pod.shell_command[0]", "must not be empty"),
        ({"pod": {"shell_command": ["/bin/sh", "a\0b"]}}, "pod.shell_command[1]", "NUL"),
        ({"pod": {"subsystems": {"sftp": []}}}, "pod.subsystems.sftp", "non-empty"),
        ({"pod": {"subsystems": {"": ["/x"]}}}, "pod.subsystems", "subsystem name"),
        ({"pod": {"pid_dir": "tmp"}}, "pod.pid_dir", "absolute path"),
        ({"logging": {"format": "yaml"}}, "logging.format", "'text', 'json'"),
        ({"logging": {"level": "LOUD"}}, "logging.level", "'DEBUG'"),
    ],
)
def test_invalid_values_name_the_key(data: Any, path: str, problem: str) -> None:
    err = error_for(data)
    assert err.path == path, str(err)
    assert problem in str(err)


def test_user_mode_keys() -> None:
    cfg = config_from_dict(
        {
            "pod": {
                "mode": "user",
                "idle_timeout": 0,
                "lease_duration": 2.5,
                "metadata": {"name": "ws-{username}"},
            }
        }
    )
    assert (cfg.pod.mode, cfg.pod.idle_timeout, cfg.pod.lease_duration) == ("user", 0, 2.5)
    defaults = config_from_dict({"pod": {"mode": "user"}}).pod
    assert (defaults.idle_timeout, defaults.lease_duration) == (1800, 15)


@pytest.mark.parametrize(
    "version", [None, "OpenSSH_8.0", "OpenSSH_10.0 kuberun", "OpenSSH_9.9 a b-c", "x" * 245]
)
def test_valid_server_versions(version: str | None) -> None:
    assert config_from_dict({"ssh": {"server_version": version}}).ssh.server_version == version


def test_authorized_keys_template_may_escape_braces() -> None:
    cfg = config_from_dict({"ssh": {"authorized_keys": "/k/{{x}}/{username}"}})
    assert cfg.ssh.authorized_keys == "/k/{{x}}/{username}"


# --------------------------------------------------------------------------
# Listen addresses


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0.0.0.0:2222", ("0.0.0.0", 2222)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("gateway.example.com:22", ("gateway.example.com", 22)),
        ("[::1]:22", ("::1", 22)),
        ("[::]:2222", ("::", 2222)),
        ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value, "ssh.listen") == expected


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("2222", "the port is required"),
        ("host:", "0 to 65535"),
        ("host:65536", "0 to 65535"),
        ("host:-1", "0 to 65535"),
        ("host:+22", "0 to 65535"),
        ("host: 22", "0 to 65535"),
        ("host:22x", "0 to 65535"),
        ("::1:22", "brackets"),
        ("[::1]22", "[IPv6]:PORT"),
        ("[::1]", "[IPv6]:PORT"),
        ("[nope]:22", "not an IPv6 address"),
        (":22", "not a host name"),
        ("bad_host:22", "not a host name"),
        ("-x:22", "not a host name"),
        ("a b:22", "not a host name"),
    ],
)
def test_parse_listen_rejects(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen(value, "metrics.listen")
    assert info.value.path == "metrics.listen"
    assert problem in str(info.value)


def test_listen_is_validated_in_both_sections() -> None:
    assert error_for({"ssh": {"listen": "x"}}).path == "ssh.listen"
    assert error_for({"metrics": {"listen": "[::1]"}}).path == "metrics.listen"


# --------------------------------------------------------------------------
# The Pod template


def test_console_container_must_exist() -> None:
    err = error_for({"pod": {"console_container": "main"}})
    assert err.path == "pod.console_container"
    assert "'main'" in str(err)
    assert "found: 'shell'" in str(err)


def test_spec_needs_containers() -> None:
    assert error_for({"pod": {"spec": {}}}).path == "pod.spec.containers"
    assert error_for({"pod": {"spec": {"containers": []}}}).path == "pod.spec.containers"
    assert error_for({"pod": {"spec": {"containers": {}}}}).path == "pod.spec.containers"


def test_every_container_needs_a_name() -> None:
    err = error_for({"pod": {"spec": {"containers": [{"name": "shell"}, {"image": "x"}]}}})
    assert err.path == "pod.spec.containers[1].name"
    err = error_for({"pod": {"spec": {"containers": ["shell"]}}})
    assert err.path == "pod.spec.containers[0]"


def test_metadata_needs_a_name_or_generate_name() -> None:
    err = error_for({"pod": {"metadata": {"labels": {}}}})
    assert err.path == "pod.metadata"
    assert "'name' or 'generateName'" in str(err)
    err = error_for({"pod": {"metadata": {"generateName": ""}}})
    assert err.path == "pod.metadata.generateName"
    assert error_for({"pod": {"metadata": {"name": 5}}}).path == "pod.metadata.name"
    assert config_from_dict({"pod": {"metadata": {"name": "p"}}}).pod.metadata == {"name": "p"}


def test_labels_and_annotations_must_be_strings() -> None:
    meta = {"generateName": "x-"}
    err = error_for({"pod": {"metadata": {**meta, "labels": {"tier": 1}}}})
    assert err.path == "pod.metadata.labels.tier"
    assert "expected a string, got an integer" in str(err)
    err = error_for({"pod": {"metadata": {**meta, "annotations": {"a": True}}}})
    assert err.path == "pod.metadata.annotations.a"
    err = error_for({"pod": {"metadata": {**meta, "labels": ["a"]}}})
    assert err.path == "pod.metadata.labels"


def test_metadata_namespace_must_agree_with_kubernetes_namespace() -> None:
    meta = {"generateName": "x-", "namespace": "other"}
    err = error_for({"pod": {"metadata": meta}})
    assert err.path == "pod.metadata.namespace"
    assert "kubernetes.namespace" in str(err)
    cfg = config_from_dict({"pod": {"metadata": meta}, "kubernetes": {"namespace": "other"}})
    assert cfg.pod.metadata["namespace"] == "other"


def test_spec_is_free_form_kubernetes() -> None:
    spec = {
        "containers": [
            {
                "name": "shell",
                "image": "x",
                "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}},
                "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
            }
        ],
        "volumes": [{"name": "v", "hostPath": {"path": "/x"}}],
        "anythingTheApiServerJudges": [1, 2.5, None],
    }
    assert config_from_dict({"pod": {"spec": spec}}).pod.spec == spec


def test_spec_values_must_be_json() -> None:
    import datetime

    spec = {"containers": [{"name": "shell", "when": datetime.date(2024, 1, 1)}]}
    err = error_for({"pod": {"spec": spec}})
    assert err.path == "pod.spec.containers[0].when"
    assert "quote it" in str(err)
    err = error_for({"pod": {"spec": {"containers": [{"name": "shell"}], 1: "x"}}})
    assert err.path == "pod.spec"


def test_console_helper() -> None:
    with pytest.raises(ConfigError):
        dataclasses.replace(PodConfig(), console_container="nope")


# --------------------------------------------------------------------------
# Direct construction validates too


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"ssh\.max_sessions"):
        SSHConfig(max_sessions=0)
    with pytest.raises(ConfigError, match=r"timeouts\.pod_start"):
        TimeoutsConfig(pod_start=-1)
    with pytest.raises(ConfigError, match=r"pod\.console_container"):
        PodConfig(console_container="other")
    with pytest.raises(ConfigError, match=r"kubernetes\.namespace"):
        KubernetesConfig(namespace="UPPER")


# --------------------------------------------------------------------------
# YAML files


def test_load_yaml_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        ssh:
          listen: "127.0.0.1:2022"
          accept_env: [LANG, "LC_*"]
        kubernetes:
          namespace: users
        pod:
          spec:
            containers:
              - name: shell
                image: alpine:3
        timeouts: {pod_start: 90}
        metrics:
          listen: null
        """,
    )
    cfg = load_config(path)
    assert cfg.ssh.listen == "127.0.0.1:2022"
    assert cfg.kubernetes.namespace == "users"
    assert cfg.pod.spec["containers"][0]["image"] == "alpine:3"
    assert cfg.timeouts.pod_start == 90
    assert cfg.metrics.listen is None
    assert load_config(str(path)) == cfg


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n")) == Config()


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert "cannot read" in str(info.value)


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


def test_non_utf8_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"ssh:\n  banner: \xe9t\xe9\n")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(path)


def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "ssh:\n  listen: [unclosed\npod: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path.startswith(f"{path}:")
    assert info.value.path.count(":") >= 2
    assert "invalid YAML" in str(info.value)


def test_yaml_tab_indentation_error_has_line(tmp_path: Path) -> None:
    path = write(tmp_path, "ssh:\n\tlisten: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == f"{path}:2:1"


def test_config_error_in_file_names_key_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        ssh:
          listen: "0.0.0.0:2222"
        pod:
          spek:
            containers: []
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "pod.spek"
    assert str(info.value) == (f"pod.spek: unknown key (did you mean 'spec'?) ({path}, line 4)")


def test_nested_error_points_at_the_nearest_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        pod:
          spec:
            containers:
              - name: shell
              - image: nameless
        """,
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "pod.spec.containers[1].name"
    assert f"({path}, line 5)" in str(info.value)


def test_cross_field_error_points_at_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, "pod:\n  mode: connection\n  console_container: main\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "pod.console_container"
    assert "line 3" in str(info.value)


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "ssh:\n  listen: a:1\n  max_sessions: 2\n  listen: b:2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "ssh.listen"
    assert "duplicate key" in str(info.value)
    assert "line 2" in str(info.value) and "line 4" in str(info.value)


def test_top_level_list_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "- ssh\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == str(path)
    assert "expected a mapping" in str(info.value)


def test_yaml_anchors_and_merge_keys_work(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        pod:
          spec:
            containers:
              - &base {name: shell, image: a}
              - <<: *base
                name: second
        """,
    )
    cfg = load_config(path)
    assert cfg.pod.spec["containers"][1] == {"name": "second", "image": "a"}


def test_recursive_alias_is_an_error_not_a_hang(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        pod:
          spec:
            containers: [{name: shell}]
            loop: &x [*x]
        """,
    )
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)


def test_yaml_one_one_gotchas_are_type_errors(tmp_path: Path) -> None:
    # An unquoted "on"/"no" is a boolean in YAML 1.1; a date is a date.
    path = write(tmp_path, "logging:\n  level: no\n")
    with pytest.raises(ConfigError, match=r"logging.level: expected a string, got a boolean"):
        load_config(path)
    path = write(tmp_path, "pod:\n  metadata:\n    generateName: x-\n    labels: {d: 2024-01-01}\n")
    with pytest.raises(ConfigError, match=r"pod\.metadata\.labels\.d"):
        load_config(path)


def test_the_design_example_loads(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        ssh:
          listen: "0.0.0.0:2222"
          host_keys: ["/etc/kuberun/ssh_host_ed25519_key"]
          authorized_keys: "/etc/kuberun/keys/{username}"
          accept_env: ["LANG", "LC_*"]
        kubernetes:
          kubeconfig: null
          context: null
          namespace: "default"
        pod:
          mode: "connection"
          metadata: {generateName: "kuberun-", labels: {}, annotations: {}}
          spec: {containers: [{name: "shell", image: "debian:stable-slim"}]}
          console_container: "shell"
          idle_command:
            - /bin/sh
            - -c
            - "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait; done"
          shell_command: ["/bin/sh"]
          subsystems: {sftp: ["/usr/lib/openssh/sftp-server"]}
        timeouts: {pod_start: 60, pod_stop: 30, command_start: 30}
        metrics: {listen: "127.0.0.1:9100"}
        """,
    )
    cfg = load_config(path)
    assert dataclasses.replace(cfg, ssh=SSHConfig()) == Config()
    assert cfg.ssh.authorized_keys == "/etc/kuberun/keys/{username}"


# --------------------------------------------------------------------------
# The Kubernetes client


def _ca_pem() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kuberun-test-ca")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def no_cluster_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No in-cluster variables, no $KUBECONFIG, an empty HOME."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.setenv("HOME", str(home))
    return home


def write_kubeconfig(
    path: Path,
    *,
    server: str = "https://127.0.0.1:6443",
    token: str = "s3cret-token",
    contexts: tuple[str, ...] = ("test",),
    current: str | None = "test",
    ca: bytes | None = None,
    extra_cluster: dict[str, Any] | None = None,
    user: dict[str, Any] | None = None,
) -> bytes:
    import base64

    import yaml

    ca = ca if ca is not None else _ca_pem()
    cluster = {"server": server, "certificate-authority-data": base64.b64encode(ca).decode()}
    cluster.update(extra_cluster or {})
    data: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": "u", "user": user if user is not None else {"token": token}}],
        "contexts": [{"name": n, "context": {"cluster": "c", "user": "u"}} for n in contexts],
    }
    if current is not None:
        data["current-context"] = current
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return ca


async def test_make_api_client_from_explicit_kubeconfig(
    no_cluster_env: Path, tmp_path: Path
) -> None:
    from kubernetes_asyncio.client import ApiClient

    from kuberun.config import make_api_client

    path = tmp_path / "kc.yaml"
    ca = write_kubeconfig(path, server="https://10.1.2.3:6443/")
    client = await make_api_client(KubernetesConfig(kubeconfig=str(path)))
    try:
        assert isinstance(client, ApiClient)
        conf = client.configuration
        assert conf.host == "https://10.1.2.3:6443"
        assert conf.api_key["BearerToken"] == "Bearer s3cret-token"
        assert await conf.get_api_key_with_prefix("BearerToken") == "Bearer s3cret-token"
        assert conf.verify_ssl is True
        assert conf.ssl_ca_cert is not None
        with open(conf.ssl_ca_cert, "rb") as f:
            assert f.read() == ca
    finally:
        await client.close()


async def test_context_is_chosen(no_cluster_env: Path, tmp_path: Path) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    write_kubeconfig(path, contexts=("a", "b"), current="a")
    conf = await make_client_configuration(KubernetesConfig(kubeconfig=str(path), context="b"))
    assert conf.host == "https://127.0.0.1:6443"


async def test_unknown_context(no_cluster_env: Path, tmp_path: Path) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    write_kubeconfig(path, contexts=("a", "b"))
    with pytest.raises(ConfigError) as info:
        await make_client_configuration(KubernetesConfig(kubeconfig=str(path), context="zz"))
    assert info.value.path == "kubernetes.context"
    assert "'zz'" in str(info.value) and "'a', 'b'" in str(info.value)


async def test_no_current_context(no_cluster_env: Path, tmp_path: Path) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    write_kubeconfig(path, current=None)
    with pytest.raises(ConfigError) as info:
        await make_client_configuration(KubernetesConfig(kubeconfig=str(path)))
    assert info.value.path == "kubernetes.context"


async def test_missing_kubeconfig_file(no_cluster_env: Path, tmp_path: Path) -> None:
    from kuberun.config import make_api_client

    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        await make_api_client(KubernetesConfig(kubeconfig=str(missing)))
    assert info.value.path == "kubernetes.kubeconfig"
    assert str(missing) in str(info.value)


async def test_nothing_found_anywhere(no_cluster_env: Path) -> None:
    from kuberun.config import make_api_client

    with pytest.raises(ConfigError) as info:
        await make_api_client(KubernetesConfig())
    assert info.value.path == "kubernetes.kubeconfig"
    assert ".kube/config" in str(info.value)
    assert "KUBERNETES_SERVICE_HOST" in str(info.value)


async def test_broken_kubeconfig_does_not_echo_its_contents(
    no_cluster_env: Path, tmp_path: Path
) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    path.write_text("users:\n- token: supersecret: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        await make_client_configuration(KubernetesConfig(kubeconfig=str(path)))
    assert info.value.path == "kubernetes.kubeconfig"
    assert "supersecret" not in str(info.value)


async def test_unloadable_kubeconfig(no_cluster_env: Path, tmp_path: Path) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    path.write_text(
        "contexts: [{name: x, context: {cluster: nowhere, user: u}}]\ncurrent-context: x\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        await make_client_configuration(KubernetesConfig(kubeconfig=str(path)))
    assert info.value.path == "kubernetes.kubeconfig"
    assert "cannot load" in str(info.value)


async def test_kubeconfig_env_then_home(
    no_cluster_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kuberun.config import make_client_configuration

    write_kubeconfig(no_cluster_env / ".kube" / "config", server="https://home:1")
    conf = await make_client_configuration(KubernetesConfig())
    assert conf.host == "https://home:1"

    env_file = tmp_path / "env.yaml"
    write_kubeconfig(env_file, server="https://env:2")
    monkeypatch.setenv("KUBECONFIG", f"{tmp_path / 'absent.yaml'}:{env_file}")
    conf = await make_client_configuration(KubernetesConfig())
    assert conf.host == "https://env:2"


async def test_in_cluster_config(
    no_cluster_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes_asyncio.config import incluster_config

    from kuberun.config import make_client_configuration

    token = tmp_path / "token"
    token.write_text("pod-token", encoding="utf-8")
    ca = tmp_path / "ca.crt"
    ca.write_bytes(_ca_pem())
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(ca))
    # A kubeconfig in HOME must not win over the service account.
    write_kubeconfig(no_cluster_env / ".kube" / "config", server="https://home:1")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "fd00::1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    conf = await make_client_configuration(KubernetesConfig())
    assert conf.host == "https://[fd00::1]:443"
    assert await conf.get_api_key_with_prefix("BearerToken") == "Bearer pod-token"
    assert conf.ssl_ca_cert == str(ca)

    # An explicit kubeconfig wins over the in-cluster configuration.
    conf = await make_client_configuration(
        KubernetesConfig(kubeconfig=str(no_cluster_env / ".kube" / "config"))
    )
    assert conf.host == "https://home:1"


async def test_in_cluster_failure_is_a_config_error(
    no_cluster_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes_asyncio.config import ConfigException, incluster_config

    from kuberun.config import make_client_configuration

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")

    def broken(**kwargs: Any) -> None:
        raise ConfigException("Service token file does not exist.")

    monkeypatch.setattr(incluster_config, "load_incluster_config", broken)
    with pytest.raises(ConfigError) as info:
        await make_client_configuration(KubernetesConfig())
    assert info.value.path == "kubernetes.kubeconfig"
    assert "in-cluster" in str(info.value)


async def test_verify_tls_false_warns_every_time(
    no_cluster_env: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    write_kubeconfig(path)
    cfg = KubernetesConfig(kubeconfig=str(path), verify_tls=False)
    for _ in range(2):
        caplog.clear()
        conf = await make_client_configuration(cfg)
        assert conf.verify_ssl is False
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1
        assert "verify_tls" in warnings[0].getMessage()
        assert "s3cret-token" not in caplog.text


async def test_insecure_kubeconfig_warns(
    no_cluster_env: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kuberun.config import make_client_configuration

    path = tmp_path / "kc.yaml"
    write_kubeconfig(path, extra_cluster={"insecure-skip-tls-verify": True})
    conf = await make_client_configuration(KubernetesConfig(kubeconfig=str(path)))
    assert conf.verify_ssl is False
    assert "insecure-skip-tls-verify" in caplog.text


async def test_token_file_is_reread_for_rotation(
    no_cluster_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kuberun import _kubeclient
    from kuberun.config import make_client_configuration

    token_file = tmp_path / "token"
    token_file.write_text("first", encoding="utf-8")
    path = tmp_path / "kc.yaml"
    write_kubeconfig(path, user={"tokenFile": str(token_file)}, extra_cluster={})
    conf = await make_client_configuration(KubernetesConfig(kubeconfig=str(path)))
    assert await conf.get_api_key_with_prefix("BearerToken") == "Bearer first"
    token_file.write_text("second", encoding="utf-8")
    # Within the refresh interval the token is not re-read ...
    assert await conf.get_api_key_with_prefix("BearerToken") == "Bearer first"
    # ... after it, it is.
    clock = time.monotonic() + _kubeclient.REFRESH_INTERVAL + 1
    # _kubeclient reads the clock as ``time.monotonic()``.
    monkeypatch.setattr("kuberun._kubeclient.time.monotonic", lambda: clock)
    assert await conf.get_api_key_with_prefix("BearerToken") == "Bearer second"


async def test_exec_credential_plugin(no_cluster_env: Path, tmp_path: Path) -> None:
    import sys

    from kuberun.config import make_client_configuration

    plugin = tmp_path / "plugin.py"
    plugin.write_text(
        "import json\n"
        "print(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1beta1',"
        " 'kind': 'ExecCredential', 'status': {'token': 'from-plugin'}}))\n",
        encoding="utf-8",
    )
    path = tmp_path / "kc.yaml"
    user = {
        "exec": {
            "apiVersion": "client.authentication.k8s.io/v1beta1",
            "command": sys.executable,
            "args": [str(plugin)],
            "interactiveMode": "Never",
        }
    }
    write_kubeconfig(path, user=user)
    conf = await make_client_configuration(KubernetesConfig(kubeconfig=str(path)))
    assert await conf.get_api_key_with_prefix("BearerToken") == "Bearer from-plugin"
