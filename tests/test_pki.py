"""Certificates and node keys for a secure deployment (fedprune.deploy.pki): what Flower
reads, and every bad file turned into a message that names it."""

from __future__ import annotations

import datetime as dt
import shutil
import stat

import pytest
from cryptography import x509

from fedprune.cli import main
from fedprune.deploy.pki import Pki, PkiError, check_node_key, check_server, make_pki

HOSTS = ["127.0.0.1", "localhost", "superlink"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), HOSTS, nodes=2)


def _copy(pki: Pki, tmp_path) -> Pki:
    return Pki(shutil.copytree(pki.root, tmp_path / "copy"))


def test_server_certificate_names_every_host_and_chains_to_the_ca(pki):
    check_server(pki, "127.0.0.1")
    check_server(pki, "superlink")
    cert = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_owner_only_and_node_keys_are_what_flower_reads(pki):
    from flwr.cli.supernode.register import try_load_public_key

    for path in (pki.ca_key, pki.server_key, pki.node_key(0), pki.superexec_secret):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for i in range(2):
        check_node_key(pki.node_key(i))
        assert try_load_public_key(pki.node_public(i))  # the `flwr supernode register` path
    assert pki.node_public(0).read_bytes() != pki.node_public(1).read_bytes()
    assert len(pki.superexec_secret.read_text()) == 64


def test_a_host_missing_from_the_certificate_is_named(pki):
    with pytest.raises(PkiError, match=r"not '10\.0\.0\.9'.*--hosts 10\.0\.0\.9"):
        check_server(pki, "10.0.0.9")


def test_expired_and_not_yet_valid_certificates_are_named(tmp_path):
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    old = make_pki(tmp_path / "old", HOSTS, nodes=0, days=1, now=past)
    with pytest.raises(PkiError, match=r"ca\.crt expired"):
        check_server(old, "127.0.0.1")
    future = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=10)
    early = make_pki(tmp_path / "early", HOSTS, nodes=0, now=future)
    with pytest.raises(PkiError, match=r"ca\.crt is not valid before"):
        check_server(early, "127.0.0.1")


def test_a_server_certificate_from_another_ca_is_refused(pki, tmp_path):
    mixed = _copy(pki, tmp_path)
    other = make_pki(tmp_path / "other", HOSTS, nodes=0)
    shutil.copy(other.ca_cert, mixed.ca_cert)
    with pytest.raises(PkiError, match=r"server\.crt is not signed by the CA .*ca\.crt"):
        check_server(mixed, "127.0.0.1")
    mismatched = _copy(other, tmp_path / "k")
    shutil.copy(pki.server_key, mismatched.server_key)
    with pytest.raises(PkiError, match=r"server\.key does not belong to .*server\.crt"):
        check_server(mismatched, "127.0.0.1")


def test_missing_and_garbage_files_are_named(pki, tmp_path):
    broken = _copy(pki, tmp_path)
    broken.server_cert.unlink()
    with pytest.raises(PkiError, match=r"certificate .*server\.crt does not exist"):
        check_server(broken, "127.0.0.1")
    broken.node_key(1).write_text("not a key")
    with pytest.raises(PkiError, match=r"SuperNode key .*node-1 is not an OpenSSH"):
        check_node_key(broken.node_key(1))
    with pytest.raises(PkiError, match=r"node-7 does not exist"):
        check_node_key(broken.node_key(7))


def test_certs_command_makes_and_checks_and_fails_with_status_2(tmp_path, capsys):
    out = tmp_path / "pki"
    assert main(["certs", "--out", str(out), "--hosts", "127.0.0.1", "--nodes", "3"]) == 0
    assert main(["certs", "--out", str(out), "--check", "--hosts", "127.0.0.1",
                 "--nodes", "3"]) == 0
    assert main(["certs", "--out", str(out), "--check", "--nodes", "4"]) == 2
    assert "node-3 does not exist" in capsys.readouterr().err


def test_a_node_public_key_from_another_pair_is_named(pki, tmp_path):
    mixed = _copy(pki, tmp_path)
    shutil.copy(mixed.node_public(1), mixed.node_public(0))
    with pytest.raises(PkiError, match=r"node-0\.pub does not belong to .*node-0"):
        check_node_key(mixed.node_key(0))


def test_a_stale_world_readable_temp_file_does_not_leak_its_mode(tmp_path):
    root = tmp_path / "pki"
    (root / "nodes").mkdir(parents=True)
    stale = root / "ca.key.tmp"
    stale.write_text("old")
    stale.chmod(0o644)
    pki = make_pki(root, ["127.0.0.1"], nodes=1)
    assert stat.S_IMODE(pki.ca_key.stat().st_mode) == 0o600
