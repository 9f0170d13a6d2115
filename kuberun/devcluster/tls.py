"""Throw-away TLS material for devcluster (a test double, not a production runtime).

A fresh CA and a serving certificate signed by it are generated on every start,
so kubeconfigs carry the CA and clients verify the server as they would verify
a real API server (Go's TLS stack requires SANs and key usages, not the CN).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["Certificates", "generate_certificates", "server_ssl_context"]


@dataclass(frozen=True)
class Certificates:
    """PEM-encoded CA certificate, serving certificate and its private key (and the
    CA's key, so a restarted cluster can keep its CA)."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    ca_key_pem: bytes = b""


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        host = host.strip("[]")
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def generate_certificates(hosts: list[str], ca: tuple[bytes, bytes] | None = None) -> Certificates:
    """Create a CA and a serving certificate valid for ``hosts`` plus loopback names.

    ``ca`` (certificate and key, PEM) is a CA to sign with instead of a new one:
    clients that trust it keep working across restarts. Unspecified addresses
    (``0.0.0.0``, ``::``) add the machine's host name, since clients then connect
    by name or loopback address.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=365)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "devcluster-ca")])
    if ca is not None:
        ca_cert = x509.load_pem_x509_certificate(ca[0])
        loaded = serialization.load_pem_private_key(ca[1], password=None)
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise ValueError("the devcluster CA key is not an EC key")
        ca_key = loaded
        ca_name = ca_cert.subject
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
        ca_cert = _ca_certificate(ca_key, ca_name, ca_ski, not_before, not_after)
    return _serving(hosts, ca_cert, ca_key, ca_name, ca_ski, not_before, not_after)


def _ca_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_ski: x509.SubjectKeyIdentifier,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA256())
    )


def _serving(
    hosts: list[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    ca_ski: x509.SubjectKeyIdentifier,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
) -> Certificates:
    all_hosts = ["127.0.0.1", "::1", "localhost", "kubernetes", "kubernetes.default"]
    for host in hosts:
        all_hosts.append(host)
        if host.strip("[]") in ("0.0.0.0", "::", ""):
            all_hosts.append(socket.gethostname())
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(_san_entries(all_hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return Certificates(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        ca_key_pem=ca_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def server_ssl_context(certs: Certificates) -> ssl.SSLContext:
    """An HTTP/1.1-only server context (exec upgrades are impossible over h2)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["http/1.1"])
    # Let the client's cipher order win: Go and OpenSSL clients put AES-128-GCM first
    # on CPUs with AES instructions, which is the cheapest suite for bulk exec output.
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # load_cert_chain only reads files; the key never outlives this call on disk.
    with tempfile.TemporaryDirectory(prefix="devcluster-tls-") as tmp:
        chain = Path(tmp) / "chain.pem"
        keyfile = Path(tmp) / "key.pem"
        chain.write_bytes(certs.cert_pem + certs.ca_pem)
        keyfile.touch(mode=0o600)
        keyfile.write_bytes(certs.key_pem)
        ctx.load_cert_chain(str(chain), str(keyfile))
    return ctx
