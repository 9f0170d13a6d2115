"""``ssh.permit_open`` (OpenSSH PermitOpen syntax), the Pod's own names, and the
forwarding keys of the config."""

from __future__ import annotations

import pytest

from kuberun.config import config_from_dict
from kuberun.errors import ConfigError
from kuberun.permitopen import PermitOpen, is_local_host, names_the_pod


def test_any_and_none() -> None:
    assert PermitOpen.parse(["any"]).allows("anything", 1)
    assert not PermitOpen.parse(["none"]).allows("localhost", 80)


def test_entries_are_compared_as_written() -> None:
    rules = PermitOpen.parse(["localhost:8080", "[::1]:*", "*:22", "web-0:443"])
    assert rules.allows("localhost", 8080)
    assert not rules.allows("localhost", 8081)
    assert not rules.allows("127.0.0.1", 8080)  # no address lookups, as in OpenSSH
    assert rules.allows("::1", 1) and rules.allows("::1", 65535)
    assert rules.allows("example.com", 22) and rules.allows("10.1.2.3", 22)
    assert rules.allows("web-0", 443) and not rules.allows("web-0", 80)


@pytest.mark.parametrize(
    ("value", "path", "problem"),
    [
        ([], "ssh.permit_open", 'expected at least one entry (["none"] refuses everything)'),
        (["any", "a:1"], "ssh.permit_open[0]", "'any' must be the only entry"),
        (["a:1", "none"], "ssh.permit_open[1]", "'none' must be the only entry"),
        (["localhost"], "ssh.permit_open[0]", "'localhost' is not host:port (the port is missing)"),
        (
            ["::1:80"],
            "ssh.permit_open[0]",
            "'::1:80': write an IPv6 address in brackets, [addr]:port",
        ),
        (["[::1]80"], "ssh.permit_open[0]", "'[::1]80' is not [IPv6-address]:port"),
        ([":80"], "ssh.permit_open[0]", "':80' has an empty host (use '*' for any host)"),
        (["a:0"], "ssh.permit_open[0]", "'a:0': the port must be 1..65535 or '*'"),
        (["a:65536"], "ssh.permit_open[0]", "'a:65536': the port must be 1..65535 or '*'"),
        (["a:x"], "ssh.permit_open[0]", "'a:x': the port must be 1..65535 or '*'"),
        (["a b:1"], "ssh.permit_open[0]", "'a b:1' is not host:port"),
    ],
)
def test_bad_entries_name_the_key(value: list[str], path: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ssh": {"permit_open": value}})
    assert (info.value.path, info.value.problem) == (path, problem)


def test_config_keys() -> None:
    config = config_from_dict({})
    assert config.ssh.allow_tcp_forwarding is True
    assert config.ssh.permit_open == ("any",)
    config = config_from_dict(
        {"ssh": {"allow_tcp_forwarding": False, "permit_open": ["localhost:8080"]}}
    )
    assert config.ssh.allow_tcp_forwarding is False
    assert config.ssh.permitted_opens.allows("localhost", 8080)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ssh": {"allow_tcp_forwarding": "yes"}})
    assert info.value.path == "ssh.allow_tcp_forwarding"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ssh": {"permit_open": "any"}})
    assert info.value.path == "ssh.permit_open"
    with pytest.raises(ConfigError) as info:
        config_from_dict({"ssh": {"permit_opens": ["any"]}})
    assert "did you mean 'permit_open'" in str(info.value)


def test_the_pods_own_names() -> None:
    for host in ("localhost", "LocalHost", "127.0.0.1", "::1", "0.0.0.0"):
        assert is_local_host(host)
    for host in ("127.0.0.2", "example.com", "", "localhost.", "[::1]"):
        assert not is_local_host(host)
    assert names_the_pod("Kuberun-AbC", "kuberun-abc", ["10.0.0.7"])
    assert names_the_pod("10.0.0.7", "kuberun-abc", ["10.0.0.7", "fd00::7"])
    assert names_the_pod("FD00::7", "kuberun-abc", ["10.0.0.7", "fd00::7"])
    assert not names_the_pod("10.0.0.8", "kuberun-abc", ["10.0.0.7"])
    assert not names_the_pod("kuberun-abd", "kuberun-abc", [])
