"""DKIM test keys and signed test messages (keys made fresh per test session, never stored)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

SIGNED_HEADERS = [b"from", b"to", b"subject", b"date", b"message-id"]


@dataclass(frozen=True)
class Key:
    algorithm: bytes  # dkimpy's signature_algorithm
    private: bytes  # what dkim.sign() takes
    record: str  # the DNS TXT value for <selector>._domainkey.<domain>


def rsa_key(bits: int = 2048) -> Key:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    return Key(b"rsa-sha256", private, "v=DKIM1; k=rsa; p=" + base64.b64encode(public).decode())


def ed25519_key() -> Key:
    signing = nacl.signing.SigningKey.generate()
    private = signing.encode(encoder=nacl.encoding.Base64Encoder)
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return Key(b"ed25519-sha256", private, "v=DKIM1; k=ed25519; p=" + public)


def message(from_addr: str = "Alice <alice@example.com>", body: str = "Hello Bob.\r\n",
            extra_headers: str = "") -> bytes:
    return (f"{extra_headers}From: {from_addr}\r\nTo: bob@mx.test.example\r\n"
            "Subject: hello\r\nDate: Sat, 21 Nov 2026 05:00:00 +0000\r\n"
            "Message-ID: <m1@example.com>\r\n\r\n" + body).encode()


def sign(raw: bytes, key: Key, domain: str, selector: str = "sel") -> bytes:
    header = dkim.sign(raw, selector.encode(), domain.encode(), key.private,
                       signature_algorithm=key.algorithm, include_headers=SIGNED_HEADERS)
    return header + raw
