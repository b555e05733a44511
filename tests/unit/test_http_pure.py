"""Pure pieces of the HTTP surface: webhook verification, cursors, form parsing."""

from __future__ import annotations

import hashlib
import hmac
import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import Store

from smtpd_agent.http import sns
from smtpd_agent.http.api import decode_cursor, encode_cursor
from smtpd_agent.http.limits import CappedStream
from smtpd_agent.http.responses import HttpError
from smtpd_agent.http.sns import string_to_sign as sns_string_to_sign
from smtpd_agent.http.webhooks import (
    VerificationError,
    basic_credentials,
    check_fresh,
    form_fields,
    verify_mailgun,
)
from tests.sns import Authority

KEY = "key-test"


def sign(timestamp: str, token: str) -> str:
    return hmac.new(KEY.encode(), (timestamp + token).encode(), hashlib.sha256).hexdigest()


@pytest.mark.parametrize("signature, timestamp, message", [
    ("é" * 64, "1000", "bad signature"),           # non-ASCII must not crash compare_digest
    ("\ud800", "1000", "bad signature"),
    (None, "1000", None),
    (None, "1", "stale timestamp"),
    (None, "nan", "stale timestamp"),
    (None, "soon", "bad timestamp"),
])
def test_mailgun_verification(signature, timestamp, message):
    signature = signature if signature is not None else sign(timestamp, "tok")
    if message is None:
        verify_mailgun(KEY, timestamp, "tok", signature, now=1000.0, max_age=300)
        return
    with pytest.raises(VerificationError, match=message):
        verify_mailgun(KEY, timestamp, "tok", signature, now=1000.0, max_age=300)


def test_freshness_window_is_symmetric():
    check_fresh("1300", 1000.0, 300)
    with pytest.raises(VerificationError):
        check_fresh("1301", 1000.0, 300)


def test_sns_canonical_strings_follow_the_documented_key_order():
    notification = {"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": "x",
                    "Timestamp": "ts", "Signature": "ignored", "SigningCertURL": "ignored"}
    assert sns_string_to_sign(notification) == (
        b"Message\nx\nMessageId\nm\nTimestamp\nts\nTopicArn\nt\nType\nNotification\n")
    with_subject = {**notification, "Subject": "s"}
    assert b"MessageId\nm\nSubject\ns\nTimestamp" in sns_string_to_sign(with_subject)
    confirmation = {"Type": "SubscriptionConfirmation", "MessageId": "m", "TopicArn": "t",
                    "Message": "x", "Timestamp": "ts", "Token": "k", "SubscribeURL": "u",
                    "Subject": "not signed for confirmations"}
    assert sns_string_to_sign(confirmation) == (
        b"Message\nx\nMessageId\nm\nSubscribeURL\nu\nTimestamp\nts\nToken\nk\nTopicArn\nt\n"
        b"Type\nSubscriptionConfirmation\n")


def test_cursor_round_trip_and_garbage():
    moment = datetime(2026, 11, 21, 6, 0, tzinfo=UTC)
    cursor = decode_cursor(encode_cursor(moment, 42))
    assert cursor.last_message_at == moment and cursor.id == 42
    for garbage in ("", "!!!", "bm90aGluZw", encode_cursor(moment, 42)[:-3],
                    "MjAyNi0wMS0wMXw5OTk5OTk5OTk5OTk5OTk5OTk5OQ"):
        with pytest.raises(ValueError):
            decode_cursor(garbage)


def test_basic_credentials():
    assert basic_credentials("Basic dXNlcjpwYTpzcw==") == (b"user", b"pa:ss")
    for header in ("", "Bearer x", "Basic ***", "Basic dXNlcg=="):
        assert basic_credentials(header) is None


def test_form_fields_parses_multipart_bytes():
    body = (b'--b\r\nContent-Disposition: form-data; name="email"\r\n\r\nraw\r\nbytes\r\n'
            b'--b\r\nContent-Disposition: form-data; name="envelope"\r\n\r\n{}\r\n--b--\r\n')
    fields = form_fields("multipart/form-data; boundary=b", body)
    assert fields == {"email": b"raw\r\nbytes", "envelope": b"{}"}
    with pytest.raises(ValueError):
        form_fields("text/plain", body)


def test_sns_timestamp_window():
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    sns.check_timestamp({"Timestamp": "2026-12-01T11:00:00.000Z"}, now, 3600)
    sns.check_timestamp({"Timestamp": "2026-12-01T13:00:00Z"}, now, 3600)
    for stamp, message in (("2026-12-01T10:59:59.999Z", "stale"), ("2026-12-01T13:00:01Z", "stale"),
                           ("2026-12-01T12:00:00", "bad"), ("yesterday", "bad"), ("", "bad")):
        with pytest.raises(VerificationError, match=message):
            sns.check_timestamp({"Timestamp": stamp}, now, 3600)


def test_sns_subscribe_url_is_the_confirm_action_on_the_sns_host():
    origin = re.compile(r"^https://sns\.[a-z]{2}(-[a-z]+)+-[0-9]+\.amazonaws\.com(\.cn)?/")
    base = "https://sns.eu-west-1.amazonaws.com/"
    assert sns.subscribe_url_allowed(f"{base}?Action=ConfirmSubscription&TopicArn=a&Token=t",
                                     origin)
    for url in (f"{base}?Action=Unsubscribe", f"{base}x?Action=ConfirmSubscription",
                "https://sns.s3.amazonaws.com/?Action=ConfirmSubscription",
                f"{base}?Action=ConfirmSubscription#f"):
        assert not sns.subscribe_url_allowed(url, origin), url


def test_sns_certificate_chain_through_an_intermediate():
    root = Authority.create("Root")
    intermediate_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.now(UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Intermediate")])
    intermediate = Authority(intermediate_key, (
        x509.CertificateBuilder().subject_name(name).issuer_name(root.certificate.subject)
        .public_key(intermediate_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=9))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(intermediate_key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            root.key.public_key()), critical=False)
        .sign(root.key, hashes.SHA256())))
    key, leaf = intermediate.issue()
    roots = Store([root.certificate])
    # the leaf alone does not reach the root; with its intermediate in the file it does
    with pytest.raises(VerificationError, match="not trusted"):
        sns.verify_certificate(leaf, roots, "sns.amazonaws.com", now)
    public, not_after = sns.verify_certificate(leaf + intermediate.pem(), roots,
                                               "sns.amazonaws.com", now)
    assert public.public_numbers() == key.public_key().public_numbers()
    assert not_after > now
    # an intermediate in the trust store is enough on its own
    sns.verify_certificate(leaf, Store([intermediate.certificate]),
                           "sns.amazonaws.com", now)
    with pytest.raises(VerificationError, match="not trusted"):
        sns.verify_certificate(leaf + intermediate.pem(), roots, "sns.amazonaws.com",
                               now + timedelta(days=30))
    for junk in (b"", b"not a pem", leaf * 5):
        with pytest.raises(VerificationError):
            sns.verify_certificate(junk, roots, "sns.amazonaws.com", now)


class Chunks:
    """Just enough of aiohttp's StreamReader for CappedStream."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self, n: int) -> bytes:
        taken, self.data = self.data[:n], self.data[n:]
        return taken

    async def readline(self, **_: object) -> bytes:
        line, newline, self.data = self.data.partition(b"\n")
        return line + newline

    def at_eof(self) -> bool:
        return not self.data

    def unread_data(self, data: bytes) -> None:
        self.data = data + self.data


async def test_capped_stream_counts_what_is_kept():
    stream = CappedStream(Chunks(b"a\n" + b"x" * 100), limit=60)
    assert await stream.readline() == b"a\n"
    chunk = await stream.read(50)
    stream.unread_data(chunk[10:])  # given back: not counted
    assert len(await stream.read(40)) == 40
    with pytest.raises(HttpError) as refused:
        await stream.read(50)
    assert refused.value.status == 413
    with pytest.raises(ValueError):
        await CappedStream(Chunks(b"x"), 10).read()


def test_sns_trust_store_is_the_given_bundle_or_the_systems(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"junk\n" + Authority.create().pem() + Authority.create().pem())
    assert isinstance(sns.load_trust_store(str(bundle)), Store)
    assert isinstance(sns.load_trust_store(""), Store)  # the system's bundle
    (tmp_path / "empty.pem").write_text("no certificates here\n")
    with pytest.raises(ValueError, match="no certificate"):
        sns.load_trust_store(str(tmp_path / "empty.pem"))
