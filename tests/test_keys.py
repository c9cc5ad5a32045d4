"""Key material: what `fedqf keys` and `fedqf certs` write, with which modes, and that nothing is overwritten."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedqf.crypto import CkksParameters, key_fingerprint, load_private_context, load_public_context
from fedqf.errors import KeyMaterialError
from fedqf.keys import new_ckks_keys, new_node_keys


def test_certs_cover_every_host_and_chain_to_the_ca(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "fedqf.cli", "certs", "new", str(tmp_path / "c"),
                             "--host", "coordinator.example.org", "10.0.0.5", "--host", "localhost"],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    ca = x509.load_pem_x509_certificate((tmp_path / "c" / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "c" / "server.crt").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["coordinator.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    server.verify_directly_issued_by(ca)
    assert (tmp_path / "c" / "server.key").stat().st_mode & 0o777 == 0o600


def test_ckks_ceremony_splits_secret_and_public_and_refuses_to_overwrite(tmp_path: Path) -> None:
    made = new_ckks_keys(tmp_path, CkksParameters())
    secret = load_private_context(made.institution_context.read_bytes())
    public = load_public_context(made.coordinator_context.read_bytes())
    assert key_fingerprint(secret) == key_fingerprint(public) == made.fingerprint
    assert os.stat(made.institution_context).st_mode & 0o777 == 0o600
    with pytest.raises(KeyMaterialError, match="refusing to overwrite"):
        new_ckks_keys(tmp_path, CkksParameters())


def test_node_keys_are_what_flower_reads(tmp_path: Path) -> None:
    keys = new_node_keys(tmp_path)
    private = serialization.load_ssh_private_key(keys.private_key.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(keys.public_key.read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert os.stat(keys.private_key).st_mode & 0o777 == 0o600
