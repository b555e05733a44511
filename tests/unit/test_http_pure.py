"""Pure pieces of the HTTP surface: webhook verification, cursors, form parsing."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime

import pytest

from smtpd_agent.http.api import decode_cursor, encode_cursor
from smtpd_agent.http.sns import string_to_sign as sns_string_to_sign
from smtpd_agent.http.webhooks import (
    VerificationError,
    basic_credentials,
    check_fresh,
    form_fields,
    verify_mailgun,
)

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
