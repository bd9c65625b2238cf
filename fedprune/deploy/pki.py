"""Certificates and keys for a Flower deployment: TLS for the SuperLink, SuperNode
authentication keys, and the checks that turn a bad file into a clear message.

One folder holds everything a deployment needs (``make_pki``):

- ``ca.crt`` / ``ca.key``: a private certificate authority. SuperNodes and ``flwr`` trust
  ``ca.crt``; ``ca.key`` signs and then is only needed to issue more certificates.
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, with
  the subject alternative names (DNS names and IP addresses) that clients dial: a client
  refuses a certificate that does not name the address it connected to.
- ``nodes/node-<i>`` / ``nodes/node-<i>.pub``: each SuperNode's ECDSA P-384 key pair in
  OpenSSH format, the format and curve Flower's node authentication reads
  (``flower-supernode --auth-supernode-private-key``, ``flwr supernode register``).
- ``superexec.secret``: a shared secret that authenticates SuperExec processes to a
  Runtime API reached over a network (compose), so that not anyone who reaches the port
  can pull tasks.
- ``runtime/<host>.crt`` / ``.key`` / ``.secret`` (optional): TLS and the SuperExec
  secret for a SuperNode's Runtime API where its SuperExec dials it over a network
  (compose: ``supernode-1``), one set per host, so no node holds the SuperLink's key or
  another node's secret. ``superexec.secret`` is then the SuperLink's Runtime API's.

Private keys are written with mode 0600. Nothing here imports Flower.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class PkiError(ValueError):
    """A certificate or key that a deployment cannot use; the message names the file."""


@dataclass(frozen=True)
class Pki:
    """The paths of one deployment's certificates and keys."""

    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def superexec_secret(self) -> Path:
        return self.root / "superexec.secret"

    def runtime_cert(self, host: str) -> Path:
        return self.root / "runtime" / f"{host}.crt"

    def runtime_key(self, host: str) -> Path:
        return self.root / "runtime" / f"{host}.key"

    def runtime_secret(self, host: str) -> Path:
        return self.root / "runtime" / f"{host}.secret"

    def node_key(self, index: int) -> Path:
        return self.root / "nodes" / f"node-{index}"

    def node_public(self, index: int) -> Path:
        return self.root / "nodes" / f"node-{index}.pub"


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # a stale file would keep its mode; O_EXCL refuses links
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedprune deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _builder(subject: x509.Name, issuer: x509.Name, public_key, days: float,
             now: dt.datetime) -> x509.CertificateBuilder:
    # Backdated a minute: hosts whose clocks differ slightly must not see "not yet valid".
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=days)))


def make_ca(pki: Pki, days: float = 365.0, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP384R1())
    name = _name("fedprune CA")
    cert = (_builder(name, name, key.public_key(), days, now)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write(pki.ca_key, _pem_key(key), private=True)
    _write(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM), private=False)


def make_server_cert(pki: Pki, hosts: list[str], days: float = 365.0,
                     now: dt.datetime | None = None, cert_path: Path | None = None,
                     key_path: Path | None = None) -> None:
    """A TLS certificate signed by the CA, valid for every name or address in ``hosts``
    (by default the SuperLink's: ``server.crt``)."""
    if not hosts:
        raise PkiError("a server certificate needs at least one host name or address")
    now = now or dt.datetime.now(dt.timezone.utc)
    ca_key = _load_key(pki.ca_key)
    ca_cert = load_cert(pki.ca_cert)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (_builder(_name(hosts[0]), ca_cert.subject, key.public_key(), days, now)
            .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write(key_path or pki.server_key, _pem_key(key), private=True)
    _write(cert_path or pki.server_cert, cert.public_bytes(serialization.Encoding.PEM),
           private=False)


def make_node_key(pki: Pki, index: int) -> None:
    """A SuperNode's authentication key pair (ECDSA P-384, OpenSSH format)."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(pki.node_key(index), key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption()), private=True)
    _write(pki.node_public(index), key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n",
        private=False)


def make_pki(root: str | Path, hosts: list[str], nodes: int, days: float = 365.0,
             now: dt.datetime | None = None, runtime_hosts: list[str] = ()) -> Pki:
    """A fresh CA, server certificate for ``hosts``, ``nodes`` node keys, a SuperExec
    secret, and a Runtime API certificate per ``runtime_hosts`` in ``root``. Existing
    files there are replaced."""
    if nodes < 0:
        raise PkiError(f"nodes must be >= 0, got {nodes}")
    pki = Pki(Path(root))
    make_ca(pki, days, now)
    make_server_cert(pki, hosts, days, now)
    for index in range(nodes):
        make_node_key(pki, index)
    for host in runtime_hosts:
        make_server_cert(pki, [host], days, now, pki.runtime_cert(host), pki.runtime_key(host))
        _write(pki.runtime_secret(host), secrets.token_hex(32).encode(), private=True)
    _write(pki.superexec_secret, secrets.token_hex(32).encode(), private=True)
    return pki


# ----------------------------------------------------------------------------- checks


def _read(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise PkiError(f"{what} {path} does not exist (make it with `fedprune certs`)")
    return path.read_bytes()


def load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path, "certificate"))
    except ValueError as err:
        raise PkiError(f"certificate {path} is not a PEM certificate: {err}") from err


def _load_key(path: Path):
    try:
        return serialization.load_pem_private_key(_read(path, "private key"), None)
    except (ValueError, TypeError) as err:
        raise PkiError(f"private key {path} is not an unencrypted PEM key: {err}") from err


def check_valid(cert: x509.Certificate, path: Path, now: dt.datetime | None = None) -> None:
    now = now or dt.datetime.now(dt.timezone.utc)
    if now > cert.not_valid_after_utc:
        raise PkiError(f"certificate {path} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
                       "UTC: issue new ones with `fedprune certs`")
    if now < cert.not_valid_before_utc:
        raise PkiError(f"certificate {path} is not valid before "
                       f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check the clock)")


def check_server(pki: Pki, host: str, now: dt.datetime | None = None,
                 cert_path: Path | None = None, key_path: Path | None = None) -> None:
    """What the SuperLink (or a Runtime API) will present, checked the way a client
    checks it: in date, signed by ``ca.crt``, naming ``host``, with the matching key."""
    cert_path, key_path = cert_path or pki.server_cert, key_path or pki.server_key
    ca = load_cert(pki.ca_cert)
    check_valid(ca, pki.ca_cert, now)
    cert = load_cert(cert_path)
    check_valid(cert, cert_path, now)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as err:  # InvalidSignature has no base here
        raise PkiError(f"certificate {cert_path} is not signed by the CA {pki.ca_cert}: "
                       "clients that trust that CA will refuse it") from err
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError(f"certificate {cert_path} has no subject alternative names: clients "
                       "refuse it (re-issue with `fedprune certs --hosts ...`)") from None
    known = [str(v) for v in names.get_values_for_type(x509.DNSName)]
    known += [str(v) for v in names.get_values_for_type(x509.IPAddress)]
    if host not in known:
        raise PkiError(f"certificate {cert_path} names {known}, not {host!r}: clients "
                       f"dialing {host} will refuse it (re-issue with --hosts {host},...)")
    key = _load_key(key_path)
    if key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise PkiError(f"private key {key_path} does not belong to {cert_path}")


def check_node_key(path: Path) -> None:
    """A key Flower's node authentication accepts: OpenSSH, ECDSA on a NIST curve."""
    try:
        key = serialization.load_ssh_private_key(_read(path, "SuperNode key"), None)
    except ValueError as err:
        raise PkiError(f"SuperNode key {path} is not an OpenSSH private key: {err}") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"SuperNode key {path} is {type(key).__name__}; Flower needs ECDSA "
                       "(P-384: `fedprune certs`)")
    public = path.with_name(path.name + ".pub")  # what gets registered
    if public.exists():
        try:
            registered = serialization.load_ssh_public_key(public.read_bytes())
        except ValueError as err:
            raise PkiError(f"SuperNode public key {public} is not an OpenSSH key: {err}") \
                from err
        if registered.public_numbers() != key.public_key().public_numbers():
            raise PkiError(f"SuperNode public key {public} does not belong to {path}: the "
                           "node would be refused after registering it")
