"""Throwaway secrets for a local stack: a self-signed CA, one certificate for every service
(server and client use, 127.0.0.1 and localhost), bearer tokens per role and a cache MAC key.

    secrets = LocalSecrets.create(tmp_dir)
    secrets.service_flags()   # what each service and the gateway run with
    secrets.client()          # Security for a client of the stack (CA + client token)

Everything lives in `tmp_dir` (mode 0600) and dies with it; nothing here is meant to outlive the
stack (use your own PKI and token files for a deployment: README "Security").
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pathlib
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from specmesh.wire.security import Security

HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class LocalSecrets:
    directory: pathlib.Path
    client_token: str
    service_token: str
    operator_token: str

    @property
    def ca(self) -> pathlib.Path:
        return self.directory / "ca.pem"

    @property
    def cert(self) -> pathlib.Path:
        return self.directory / "service.pem"

    @property
    def key(self) -> pathlib.Path:
        return self.directory / "service.key"

    @property
    def tokens(self) -> pathlib.Path:
        return self.directory / "tokens.txt"

    @property
    def cache_key(self) -> pathlib.Path:
        return self.directory / "cache.key"

    @classmethod
    def create(cls, directory: str | pathlib.Path) -> "LocalSecrets":
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        made = cls(d, *(secrets.token_urlsafe(32) for _ in range(3)))
        ca_key, ca_cert = _ca()
        key, cert = _leaf(ca_key, ca_cert)
        _write(made.ca, ca_cert.public_bytes(serialization.Encoding.PEM))
        _write(made.cert, cert.public_bytes(serialization.Encoding.PEM))
        _write(made.key, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        _write(made.tokens, (f"client {made.client_token}\nservice {made.service_token}\n"
                             f"operator {made.operator_token}\n").encode())
        _write(made.cache_key, secrets.token_hex(32).encode())
        return made

    def service(self) -> Security:
        """What every service and the gateway run with: TLS, the tokens file, the service
        token towards the others, the cache MAC key."""
        return Security(tls_cert=str(self.cert), tls_key=str(self.key), tls_ca=str(self.ca),
                        token_file=str(self.tokens), token=self.service_token,
                        cache_key_file=str(self.cache_key))

    def service_flags(self) -> list[str]:
        s = self.service()
        return ["--tls-cert", s.tls_cert, "--tls-key", s.tls_key, "--tls-ca", s.tls_ca,
                "--token-file", s.token_file, "--token", s.token,
                "--cache-key-file", s.cache_key_file]

    def client(self) -> Security:
        """A client of the stack: trusts the CA, sends the client token."""
        return Security(tls_ca=str(self.ca), token=self.client_token)


def _write(path: pathlib.Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
            .public_key(public_key).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=7)))


def _ca():
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name("specmesh local CA")
    cert = (_builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def _leaf(ca_key, ca_cert):
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address(HOSTS[0])), x509.DNSName(HOSTS[1])]
    cert = (_builder(_name("specmesh local service"), ca_cert.subject, key.public_key())
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert
