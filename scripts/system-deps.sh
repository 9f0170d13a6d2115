#!/usr/bin/env bash
# Install the Debian packages kuberun's tests and demo use, if any is missing:
# OpenSSH clients and rsync judge the gateway; sftp-server runs inside devcluster Pods;
# gcc builds the Cython relay; BusyBox sh is one of the shells the sh wrappers are tested with;
# asciinema judges session recordings; sshd (openssh-server) is what
# tests/integration/test_eow.py compares exit statuses with, on a port of its own (on a host
# run by systemd, the package also enables its ssh service);
# curl fetches through forwarded ports.
set -euo pipefail

missing=()
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v scp >/dev/null 2>&1 || missing+=(openssh-client)
[ -x /usr/lib/openssh/sftp-server ] || missing+=(openssh-sftp-server)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
command -v ps >/dev/null 2>&1 || missing+=(procps)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v busybox >/dev/null 2>&1 || missing+=(busybox)
command -v asciinema >/dev/null 2>&1 || missing+=(asciinema)
command -v script >/dev/null 2>&1 || missing+=(bsdutils)
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v curl >/dev/null 2>&1 || missing+=(curl)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
echo "installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
