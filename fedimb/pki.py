"""Keys and certificates for a SuperLink/SuperNode deployment, made with ``cryptography``.

An RSA certificate authority, a SuperLink server certificate signed by it whose subject
alternative names cover the addresses SuperNodes and the ``flwr`` CLI dial, and EC (NIST
P-384) key pairs in the OpenSSH format that ``flwr supernode register`` and
``flower-supernode --auth-supernode-private-key`` read. Private keys are written with mode 0600
and are never printed.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

RSA_BITS = 3072  # NIST's size for keys used beyond 2030
CA_DAYS = 3650
SERVER_DAYS = 825  # the longest server-certificate life most TLS clients accept
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1", "::1")
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA's key and self-signed certificate."""

    key: rsa.RSAPrivateKey
    cert: x509.Certificate


def is_ip(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (not a name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_alt_names(host: str) -> list[x509.GeneralName]:
    """The SuperLink certificate's SANs: ``host`` plus localhost, 127.0.0.1 and ::1, once each."""
    names: list[x509.GeneralName] = []
    for name in (host, *LOOPBACK_NAMES, *LOOPBACK_IPS):
        entry: x509.GeneralName = (x509.IPAddress(ipaddress.ip_address(name)) if is_ip(name)
                                   else x509.DNSName(name))
        if entry not in names:
            names.append(entry)
    return names


def _now() -> dt.datetime:
    # a minute back: a machine whose clock runs a little behind must still accept the certificate
    return dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)


def make_ca(common_name: str = "fedimb deployment CA") -> CertificateAuthority:
    """A new RSA CA that may sign server certificates only (path length 0)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertificateAuthority(key, cert)


def make_server_cert(ca: CertificateAuthority, host: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A TLS server key and certificate for ``host`` (see :func:`server_alt_names`), signed by ``ca``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now()).not_valid_after(_now() + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(server_alt_names(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return key, cert


def make_node_key() -> ec.EllipticCurvePrivateKey:
    """A SuperNode's authentication key: EC on NIST P-384."""
    return ec.generate_private_key(ec.SECP384R1())


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (a private key is never readable by others, not even for a moment)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have taken bits away; set exactly what was asked
        os.write(fd, data)
    finally:
        os.close(fd)


def write_rsa_key(key: rsa.RSAPrivateKey, path: Path) -> None:
    """The key as unencrypted PKCS#8 PEM, mode 0600 (what ``--ssl-keyfile`` reads)."""
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    write_file(path, data, PRIVATE_MODE)


def write_cert(cert: x509.Certificate, path: Path) -> None:
    """The certificate as PEM, mode 0644."""
    write_file(path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)


def write_node_key(key: ec.EllipticCurvePrivateKey, private_path: Path, public_path: Path) -> None:
    """The key pair in OpenSSH format: private (mode 0600) and ``.pub`` (one ``ecdsa-sha2-nistp384`` line)."""
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_file(private_path, private, PRIVATE_MODE)
    write_file(public_path, public + b"\n", PUBLIC_MODE)
