#!/usr/bin/env bash
# Install the Debian packages the real cluster needs, if any is missing:
# gcc + libc6-dev build runc (cgo) and the static pause binary; libseccomp-dev + pkg-config give
# runc seccomp support (Pods with a seccomp profile fail without it); debootstrap builds the
# Debian image; openssl makes the certificates; iproute2 removes the bridge on `down`;
# iptables serves the CNI portmap plugin (hostPort). Go itself is not installed here: the
# machines bring Go >= 1.26.
set -euo pipefail

missing=()
command -v gcc >/dev/null 2>&1 || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || [ -e /usr/lib/aarch64-linux-gnu/libc.a ] || missing+=(libc6-dev)
[ -e /usr/include/seccomp.h ] || missing+=(libseccomp-dev)
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v iptables >/dev/null 2>&1 || missing+=(iptables)
command -v tar >/dev/null 2>&1 || missing+=(tar)

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "realcluster: needs root to install: ${missing[*]}" >&2
    exit 1
fi
echo "realcluster: installing Debian packages: ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
