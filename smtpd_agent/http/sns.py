"""Amazon SNS message verification: where the signing certificate may come from, whether it
is Amazon's, the signature, and the Timestamp window. Pure; the webhook fetches and caches.

AWS, "Verifying the signatures of Amazon SNS messages": the canonical string of the
message's fields, signed RSA PKCS#1 v1.5 (SignatureVersion 1 = SHA1, 2 = SHA256) by
the certificate at SigningCertURL. Checking the signature alone proves nothing: the
URL is the sender's, so it must be Amazon's host and path
(`https://sns.<region>.amazonaws.com/SimpleNotificationService-<hex>.pem`), and the
certificate must chain to a trusted CA and name `sns.amazonaws.com`. The Timestamp
is signed; a message older (or newer) than the window is a replay, whatever its id.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import re
import ssl
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, parse_qs, urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509 import verification

# SNS canonical strings (AWS "Verifying the signatures of Amazon SNS messages").
NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
SUBSCRIPTION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                     "TopicArn", "Type")
TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
# The certificate's path on the SNS host; the host part is `http.sns_url_pattern`.
CERTIFICATE_PATH = re.compile(r"/SimpleNotificationService-[0-9a-f]{1,64}\.pem")
PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----",
                       re.DOTALL)
# More certificates than this in one signing-certificate file is not Amazon's.
MAX_CHAIN = 4


class VerificationError(ValueError):
    """The request is not provably from the provider."""


def string_to_sign(message: dict[str, Any]) -> bytes:
    keys = NOTIFICATION_KEYS if message.get("Type") == "Notification" else SUBSCRIPTION_KEYS
    parts = []
    for key in keys:
        if key in message and message[key] is not None:
            parts.append(f"{key}\n{message[key]}\n")
    return "".join(parts).encode()


def _amazon_url(url: str, origin: re.Pattern[str]) -> SplitResult | None:
    """The URL split, if it starts with the configured origin and carries no user info,
    no fragment and is well formed; else None."""
    if not origin.match(url):
        return None
    try:
        parts = urlsplit(url)
        userinfo = parts.username is not None or parts.password is not None
    except ValueError:
        return None
    return None if userinfo or parts.fragment else parts


def certificate_url_allowed(url: str, origin: re.Pattern[str]) -> bool:
    """SigningCertURL: the configured origin, then exactly Amazon's certificate path."""
    parts = _amazon_url(url, origin)
    return (parts is not None and not parts.query
            and CERTIFICATE_PATH.fullmatch(parts.path) is not None)


def subscribe_url_allowed(url: str, origin: re.Pattern[str]) -> bool:
    """SubscribeURL: the configured origin, path `/`, Action=ConfirmSubscription."""
    parts = _amazon_url(url, origin)
    return (parts is not None and parts.path == "/"
            and parse_qs(parts.query).get("Action") == ["ConfirmSubscription"])


def check_timestamp(message: dict[str, Any], now: datetime.datetime, max_age: float) -> None:
    """The signed Timestamp within `max_age` seconds of `now`, either way."""
    try:
        stamp = datetime.datetime.fromisoformat(str(message.get("Timestamp", "")))
    except ValueError:
        raise VerificationError("bad Timestamp") from None
    if stamp.tzinfo is None:
        raise VerificationError("bad Timestamp")
    if not abs((now - stamp).total_seconds()) <= max_age:
        raise VerificationError("stale Timestamp")


def load_trust_store(ca_file: str) -> verification.Store:
    """The CAs an SNS certificate must chain to: `ca_file`, else the system's bundle."""
    path = ca_file or ssl.get_default_verify_paths().cafile or ""
    if not path:
        try:
            import certifi  # botocore brings it along; only a fallback
            path = certifi.where()
        except ImportError:
            raise ValueError("no CA bundle found; set http.sns_ca_file") from None
    certificates = []
    for block in PEM_BLOCK.findall(Path(path).read_bytes()):
        # A bundle can hold a certificate this library refuses or will refuse (a negative
        # serial number, say); the others still count.
        with warnings.catch_warnings():
            warnings.simplefilter("error", CryptographyDeprecationWarning)
            try:
                certificates.append(x509.load_pem_x509_certificate(block))
            except (ValueError, CryptographyDeprecationWarning):
                continue
    if not certificates:
        raise ValueError(f"no certificate in {path}")
    return verification.Store(certificates)


def verify_certificate(pem: bytes, store: verification.Store, name: str,
                       now: datetime.datetime) -> tuple[rsa.RSAPublicKey, datetime.datetime]:
    """The signing key and its expiry, once the certificate chains to `store` and its
    subjectAltName is `name` (RFC 5280 path validation, cryptography's verifier).

    The file holds the signing certificate first; any more are intermediates.
    """
    blocks = PEM_BLOCK.findall(pem)
    if not blocks or len(blocks) > MAX_CHAIN:
        raise VerificationError("not a certificate file")
    try:
        leaf, *intermediates = (x509.load_pem_x509_certificate(b) for b in blocks)
    except ValueError:
        raise VerificationError("bad certificate") from None
    try:
        verifier = (verification.PolicyBuilder().store(store).time(now)
                    .build_server_verifier(x509.DNSName(name)))
        verifier.verify(leaf, intermediates)
    except verification.VerificationError:
        raise VerificationError("signing certificate not trusted") from None
    public_key = leaf.public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise VerificationError("signing certificate is not RSA")
    return public_key, leaf.not_valid_after_utc


def verify_signature(message: dict[str, Any], public_key: rsa.RSAPublicKey) -> None:
    algorithm = {"1": hashes.SHA1(), "2": hashes.SHA256()}.get(
        str(message.get("SignatureVersion")))
    if algorithm is None:
        raise VerificationError("unsupported SignatureVersion")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (ValueError, binascii.Error):
        raise VerificationError("bad signature encoding") from None
    try:
        public_key.verify(signature, string_to_sign(message), padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise VerificationError("bad signature") from None
