"""Key material: the CKKS key ceremony, institutions' node-authentication keys, and TLS certificates."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedqf.crypto import (
    CkksParameters,
    generate_context,
    key_fingerprint,
    serialize_private_context,
    serialize_public_context,
)
from fedqf.errors import KeyMaterialError

INSTITUTION_CONTEXT = "institution.ckks"  # holds the secret key: institutions only, mode 0600
COORDINATOR_CONTEXT = "coordinator.ckks"  # public: encryption and addition only
FINGERPRINT = "fingerprint.txt"
NODE_PRIVATE_KEY = "node.key"
NODE_PUBLIC_KEY = "node.pub"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.crt"
SERVER_KEY = "server.key"


def write_secret(path: Path, data: bytes) -> None:
    """Write a secret file readable by its owner only: mode 0600 from the moment it exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _refuse_overwrite(paths: Sequence[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise KeyMaterialError(f"{', '.join(existing)} already exist; refusing to overwrite key material (expected a new directory)")


def read_file(path: Path, *, what: str) -> bytes:
    """Read a key or certificate; a missing or unreadable file is one clear error."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyMaterialError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise KeyMaterialError(f"{path}: cannot read the {what} ({exc.strerror})") from exc


@dataclass(frozen=True)
class CkksKeys:
    institution_context: Path
    coordinator_context: Path
    fingerprint: str


def new_ckks_keys(directory: Path, params: CkksParameters) -> CkksKeys:
    """The key ceremony: one CKKS key pair for the federation.

    Writes the institutions' context (with the secret key, mode 0600), the coordinator's public context, and the
    public key's fingerprint, which both sides print and every encrypted update carries.
    """
    private_path, public_path = directory / INSTITUTION_CONTEXT, directory / COORDINATOR_CONTEXT
    _refuse_overwrite([private_path, public_path])
    context = generate_context(params)
    fingerprint = key_fingerprint(context)
    write_secret(private_path, serialize_private_context(context))
    write_public(public_path, serialize_public_context(context))
    write_public(directory / FINGERPRINT, (fingerprint + "\n").encode())
    return CkksKeys(private_path, public_path, fingerprint)


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


def new_node_keys(directory: Path) -> NodeKeys:
    """An institution's node-authentication key pair (NIST P-384), in the OpenSSH formats Flower reads."""
    private_path, public_path = directory / NODE_PRIVATE_KEY, directory / NODE_PUBLIC_KEY
    _refuse_overwrite([private_path, public_path])
    key = ec.generate_private_key(ec.SECP384R1())
    write_secret(
        private_path,
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    write_public(
        public_path,
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
    )
    return NodeKeys(private_path, public_path)


@dataclass(frozen=True)
class Certificates:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedqf"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_certificates(directory: Path, hosts: Sequence[str], *, days: int = 365) -> Certificates:
    """A CA (kept with its key, mode 0600) and the coordinator's certificate for `hosts` (DNS names or IPs)."""
    if not hosts:
        raise KeyMaterialError("certs new: at least one --host is required (the names institutions use to reach the coordinator)")
    paths = [directory / CA_CERT, directory / CA_KEY, directory / SERVER_CERT, directory / SERVER_KEY]
    _refuse_overwrite(paths)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedqf federation CA"))
        .issuer_name(_name("fedqf federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    write_public(directory / CA_CERT, ca_cert.public_bytes(pem))
    write_secret(directory / CA_KEY, ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    write_public(directory / SERVER_CERT, server_cert.public_bytes(pem))
    write_secret(
        directory / SERVER_KEY,
        server_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return Certificates(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)


def check_certificate(path: Path) -> None:
    """Fail with one clear line unless `path` is a readable PEM certificate."""
    try:
        x509.load_pem_x509_certificate(read_file(path, what="certificate"))
    except ValueError as exc:
        raise KeyMaterialError(f"{path}: not a PEM certificate ({exc})") from exc


def check_node_private_key(path: Path) -> None:
    try:
        serialization.load_ssh_private_key(read_file(path, what="node private key"), password=None)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(f"{path}: not an OpenSSH private key ({exc}); create one with `fedqf keys node DIR`") from exc


def check_node_public_key(path: Path) -> None:
    try:
        key = serialization.load_ssh_public_key(read_file(path, what="node public key"))
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(f"{path}: not an OpenSSH public key ({exc}); expected the node.pub of `fedqf keys node`") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyMaterialError(f"{path}: expected an EC (NIST curve) public key")
