"""A loopback stand-in for Amazon SNS's side of an HTTP subscription: a CA of the test's
own, a signing certificate it issues for sns.amazonaws.com, the certificate served at
/SimpleNotificationService-<hex>.pem, a SubscribeURL, and messages signed as SNS signs."""

from __future__ import annotations

import base64
import datetime
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from smtpd_agent.http.sns import string_to_sign

TOPIC = "arn:aws:sns:eu-west-1:123456789012:inbound-mail"
CERT_PATH = "/SimpleNotificationService-0123456789abcdef0123456789abcdef.pem"
SNS_NAME = "sns.amazonaws.com"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class Authority:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    @classmethod
    def create(cls, common_name: str = "Test Root CA") -> Authority:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
        return cls(key, certificate)

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, dns_name: str = SNS_NAME) -> tuple[rsa.RSAPrivateKey, bytes]:
        """A signing key and its certificate (PEM) for `dns_name`, issued by this CA."""
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder().subject_name(_name(dns_name))
            .issuer_name(self.certificate.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256()))
        return key, certificate.public_bytes(serialization.Encoding.PEM)


def now_stamp(offset: float = 0.0) -> str:
    """An SNS Timestamp: ISO 8601 UTC with milliseconds and Z."""
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class Sns:
    base: str
    key: rsa.RSAPrivateKey
    ca_file: Path
    authority: Authority
    files: dict[str, bytes]
    hits: list[str] = field(default_factory=list)

    @property
    def cert_url(self) -> str:
        return f"{self.base}{CERT_PATH}"

    def settings(self) -> dict[str, Any]:
        """The server settings that make it trust this stand-in."""
        return {"http.ses_topic_arns": [TOPIC], "http.sns_url_pattern": r"^http://127\.0\.0\.1:\d+/",
                "http.sns_ca_file": str(self.ca_file)}

    def sign(self, message: dict[str, str], version: str = "2", key: rsa.RSAPrivateKey | None = None,
             cert_url: str | None = None) -> dict[str, str]:
        algorithm = hashes.SHA256() if version == "2" else hashes.SHA1()
        signature = (key or self.key).sign(string_to_sign(message), padding.PKCS1v15(),
                                           algorithm)
        return {**message, "SignatureVersion": version,
                "SigningCertURL": cert_url or self.cert_url,
                "Signature": base64.b64encode(signature).decode()}

    @staticmethod
    def headers(message: dict[str, str]) -> dict[str, str]:
        """What SNS sends along with every post."""
        return {"Content-Type": "text/plain; charset=UTF-8",
                "x-amz-sns-message-type": str(message.get("Type", "")),
                "x-amz-sns-message-id": str(message.get("MessageId", "")),
                "x-amz-sns-topic-arn": str(message.get("TopicArn", ""))}


def notification(message: str, subject: str | None = None, timestamp: str | None = None,
                 topic: str = TOPIC) -> dict[str, str]:
    body = {"Type": "Notification", "MessageId": str(uuid.uuid4()), "TopicArn": topic,
            "Message": message, "Timestamp": timestamp or now_stamp()}
    if subject:
        body["Subject"] = subject
    return body


async def serve_sns(directory: Path) -> AsyncIterator[Sns]:
    """Run the stand-in on loopback until the generator is closed."""
    authority = Authority.create()
    ca_file = directory / "sns-ca.pem"
    ca_file.write_bytes(authority.pem())
    key, pem = authority.issue()
    files = {CERT_PATH: pem}
    hits: list[str] = []

    async def certificate(request: web.Request) -> web.Response:
        hits.append(request.path_qs)
        if request.path in files:
            return web.Response(body=files[request.path])
        if request.path == "/" and request.query.get("Action") == "ConfirmSubscription":
            return web.Response(text="<ConfirmSubscriptionResponse/>")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_get("/{tail:.*}", certificate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Sns(f"http://127.0.0.1:{port}", key, ca_file, authority, files, hits)
    finally:
        await runner.cleanup()
