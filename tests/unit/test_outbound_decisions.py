"""Outbound's pure pieces, table by table: reply classification, backoff, delivery state,
relay URLs, VERP tokens, DSN and SES notification parsing, DKIM signing."""

from __future__ import annotations

import json

import dkim
import pytest

from smtpd_agent.config import OutboundSettings, load_settings
from smtpd_agent.domains.keys import SigningKey, generate
from smtpd_agent.outbound.decisions import (Outcome, backoff, classify_reply, decide_delivery,
                                            provider_id_from_reply)
from smtpd_agent.outbound.dsn import parse_dsn, parse_ses_notification
from smtpd_agent.outbound.queue import recipients_of
from smtpd_agent.relay_url import RelayUrlError, parse_relay_url
from smtpd_agent.outbound.signing import SigningError, sign_message
from smtpd_agent.addresses import token_of
from smtpd_agent.outbound.verp import bounce_domain, new_token, verp_address


@pytest.mark.parametrize("code, enhanced, stage, expected", [
    (250, "2.0.0", "data", Outcome("sent")),
    (250, None, "api", Outcome("sent")),
    (None, None, "connect", Outcome("retry")),
    (421, "4.4.2", "mail", Outcome("retry")),
    (451, "4.3.0", "rcpt", Outcome("retry")),
    (452, "4.2.2", "rcpt", Outcome("retry")),
    (450, "4.7.1", "data", Outcome("retry")),
    (550, "5.1.1", "rcpt", Outcome("bounce", suppress=True)),
    (550, None, "rcpt", Outcome("bounce", suppress=True)),
    (550, "5.2.1", "rcpt", Outcome("bounce", suppress=True)),
    (553, "5.1.3", "data", Outcome("bounce", suppress=True)),
    (550, "5.7.1", "rcpt", Outcome("bounce")),  # policy: not the address's fault
    (554, "5.7.1", "data", Outcome("bounce")),  # content refused
    (552, "5.3.4", "data", Outcome("bounce")),
    (550, "5.1.1", "mail", Outcome("fail")),  # the relay refuses our sender
    (530, "5.7.0", "mail", Outcome("fail")),
    (354, None, "data", Outcome("retry")),
])
def test_classify_reply(code, enhanced, stage, expected):
    assert classify_reply(code, enhanced, stage) == expected


SETTINGS = OutboundSettings(retry_base=60, retry_max=3600, give_up_after=86400)


@pytest.mark.parametrize("attempt, delay", [(1, 60), (2, 120), (3, 240), (6, 1920), (7, 3600),
                                            (50, 3600), (0, 60)])
def test_backoff_doubles_and_caps(attempt, delay):
    assert backoff(attempt, SETTINGS) == delay


@pytest.mark.parametrize("outcomes, attempt, age, state, retry_in, give_up", [
    (["sent"], 1, 0, "sent", None, False),
    (["sent", "bounce"], 1, 0, "sent", None, False),
    (["bounce"], 1, 0, "bounced", None, False),
    (["bounce", "bounce"], 2, 100, "bounced", None, False),
    (["fail"], 1, 0, "failed", None, False),
    (["bounce", "fail"], 1, 0, "failed", None, False),
    (["retry"], 1, 0, "deferred", 60, False),
    (["retry", "sent"], 3, 1000, "deferred", 240, False),
    (["retry"], 5, 86000, "failed", None, True),  # the next try would be past give_up_after
    ([], 1, 0, "failed", None, False),
])
def test_decide_delivery(outcomes, attempt, age, state, retry_in, give_up):
    next_ = decide_delivery(outcomes, attempt, age, SETTINGS)
    assert (next_.state, next_.retry_in, next_.give_up) == (state, retry_in, give_up)


@pytest.mark.parametrize("text, expected", [
    ("2.0.0 Ok: queued as 4BxQ1k2abcz", "4BxQ1k2abcz"),
    ("OK id=1tXyZ9-000abc-7Q", "1tXyZ9-000abc-7Q"),
    ("2.0.0 <abcd1234@relay> queued", "abcd1234@relay"),
    ("2.0.0 Message accepted for delivery", None),
])
def test_provider_id_from_reply(text, expected):
    assert provider_id_from_reply(text) == expected


@pytest.mark.parametrize("url, host, port, tls, user, password", [
    ("smtp://relay.example.com", "relay.example.com", 587, "starttls", "", ""),
    ("smtp://u%40x:p%3Ass@relay.example.com:2525?tls=none", "relay.example.com", 2525, "none",
     "u@x", "p:ss"),
    ("smtp://relay.example.com?tls=implicit", "relay.example.com", 465, "implicit", "", ""),
    ("smtps://relay.example.com", "relay.example.com", 465, "implicit", "", ""),
    ("smtp://127.0.0.1:25?tls=none", "127.0.0.1", 25, "none", "", ""),
])
def test_relay_url(url, host, port, tls, user, password):
    relay = parse_relay_url(url)
    assert (relay.host, relay.port, relay.tls, relay.username, relay.password) == \
        (host, port, tls, user, password)
    assert password not in repr(relay) or not password
    assert (not password) or password not in relay.safe


@pytest.mark.parametrize("url", ["http://relay", "smtp://", "smtp://h?tls=maybe",
                                 "smtp://h:99999", "smtp://h?foo=1"])
def test_bad_relay_urls(url):
    with pytest.raises(RelayUrlError):
        parse_relay_url(url)


def test_config_outbound_keys_and_aws_endpoint(tmp_path):
    empty = tmp_path / "e.toml"
    empty.write_text("")
    settings = load_settings(empty, env={"AWS_ENDPOINT_URL_SES": "http://127.0.0.1:5000",
                                         "SMTPD_AGENT_OUTBOUND_TRANSPORT": "ses"})
    assert settings.outbound.ses_endpoint_url == "http://127.0.0.1:5000"
    assert settings.outbound.transport == "ses"
    from smtpd_agent.config import ConfigError
    with pytest.raises(ConfigError, match="^outbound.relay:"):
        load_settings(empty, env={"SMTPD_AGENT_OUTBOUND_RELAY": "smtp://h?tls=maybe"})
    with pytest.raises(ConfigError, match="^outbound.transport:"):
        load_settings(empty, env={"SMTPD_AGENT_OUTBOUND_TRANSPORT": "pigeon"})


def test_verp_round_trip():
    token = new_token()
    address = verp_address("b", token, "bounce.agents.test")
    local = address.partition("@")[0]
    assert token_of(local, "b") == token
    assert token_of(local.upper(), "b") == token
    assert token_of("b-short", "b") is None
    assert token_of("x-" + token, "b") is None
    assert token_of("support", "b") is None
    assert new_token() != token


@pytest.mark.parametrize("from_domain, custom, expected", [
    ("acme.agents.test", None, "bounce.agents.test"),
    ("agents.test", None, "bounce.agents.test"),
    ("mail.acme.example", "mail.mail.acme.example", "mail.mail.acme.example"),
])
def test_bounce_domain(from_domain, custom, expected):
    assert bounce_domain(from_domain, "agents.test", "bounce", custom) == expected


def test_recipients_of_to_and_cc():
    raw = (b"From: a@acme.agents.test\r\nTo: Bob <BOB@example.org>, carol@example.org\r\n"
           b"Cc: bob@example.org, Dan <dan@example.net>\r\n\r\nhi\r\n")
    assert recipients_of(raw) == ["bob@example.org", "carol@example.org", "dan@example.net"]


DSN = (b"From: MAILER-DAEMON@mx.example.org\r\nTo: b-abc@bounce.agents.test\r\n"
       b"Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: multipart/report; report-type=delivery-status; boundary=\"B\"\r\n\r\n"
       b"--B\r\nContent-Type: text/plain\r\n\r\nSorry.\r\n"
       b"--B\r\nContent-Type: message/delivery-status\r\n\r\n"
       b"Reporting-MTA: dns; mx.example.org\r\nArrival-Date: Sat, 21 Nov 2026 06:00:00 +0000\r\n\r\n"
       b"Final-Recipient: rfc822; nobody@example.org\r\nAction: failed\r\nStatus: 5.1.1\r\n"
       b"Diagnostic-Code: smtp; 550 5.1.1 <nobody@example.org>: Recipient address rejected\r\n\r\n"
       b"Final-Recipient: rfc822;later@example.org\r\nAction: delayed\r\nStatus: 4.4.1\r\n\r\n"
       b"--B\r\nContent-Type: text/rfc822-headers\r\n\r\nMessage-ID: <x@acme.agents.test>\r\n"
       b"--B--\r\n")


def test_parse_dsn():
    first, second = parse_dsn(DSN)
    assert (first.address, first.action, first.status, first.permanent) == \
        ("nobody@example.org", "failed", "5.1.1", True)
    assert "Recipient address rejected" in first.diagnostic
    assert (second.address, second.action, second.permanent) == ("later@example.org", "delayed",
                                                                 False)
    assert parse_dsn(b"From: x@y\r\nSubject: out of office\r\n\r\nI am away.\r\n") == []


def ses_bounce(kind: str = "Permanent") -> dict:
    return {"notificationType": "Bounce", "mail": {"messageId": "0100-abc"},
            "bounce": {"bounceType": kind, "bounceSubType": "General",
                       "bouncedRecipients": [{"emailAddress": "Gone@Example.org"}]}}


def test_parse_ses_notifications():
    event = parse_ses_notification(json.dumps(ses_bounce()))
    assert (event.kind, event.permanent, event.addresses, event.provider_message_id) == \
        ("bounce", True, ("gone@example.org",), "0100-abc")
    wrapped = json.dumps({"Type": "Notification", "Message": json.dumps(ses_bounce("Transient"))})
    assert parse_ses_notification(wrapped).permanent is False
    complaint = {"eventType": "Complaint", "mail": {"messageId": "m2"},
                 "complaint": {"complainedRecipients": [{"emailAddress": "angry@example.org"}],
                               "complaintFeedbackType": "abuse"}}
    event = parse_ses_notification(json.dumps(complaint))
    assert (event.kind, event.addresses, event.detail) == ("complaint", ("angry@example.org",),
                                                           "abuse")


def keypair(domain: str) -> tuple[list[SigningKey], dict[bytes, bytes]]:
    keys, records = [], {}
    for algorithm, selector in (("rsa-2048", "s-rsa"), ("ed25519", "s-ed")):
        private, public = generate(algorithm)
        keys.append(SigningKey(domain, selector, algorithm, private))
        k = "rsa" if algorithm == "rsa-2048" else "ed25519"
        records[f"{selector}._domainkey.{domain}.".encode()] = f"v=DKIM1; k={k}; p={public}".encode()
    return keys, records


MESSAGE = (b"From: Support <support@acme.agents.test>\r\nTo: bob@example.org\r\n"
           b"Subject: Re: order\r\nDate: Sat, 21 Nov 2026 06:00:00 +0000\r\n"
           b"Message-ID: <r1@acme.agents.test>\r\nIn-Reply-To: <q1@example.org>\r\n"
           b"References: <q1@example.org>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\nYour order ships today.\r\n")


def test_sign_message_rsa_and_ed25519_verify():
    keys, records = keypair("agents.test")
    signed = sign_message(MESSAGE, keys)
    assert signed.endswith(MESSAGE)
    dnsfunc = lambda name, timeout=5: records.get(name, b"")  # noqa: E731

    def verifies(raw: bytes, index: int) -> bool:
        try:
            return bool(dkim.DKIM(raw).verify(idx=index, dnsfunc=dnsfunc))
        except dkim.DKIMException:
            return False

    assert verifies(signed, 0) and verifies(signed, 1)
    headers = signed.split(b"\r\n\r\n")[0].decode()
    assert "a=ed25519-sha256" in headers and "a=rsa-sha256" in headers
    assert "c=relaxed/relaxed" in headers
    signed_fields = headers.split("h=")[1].split(";")[0].replace("\r\n", "").replace(" ", "")
    for name in ("from", "to", "subject", "date", "message-id", "in-reply-to", "references",
                 "mime-version", "content-type"):
        assert name in signed_fields.lower().split(":"), name
    tampered = signed.replace(b"ships today", b"ships never")
    assert not verifies(tampered, 0) and not verifies(tampered, 1)


def test_sign_message_refuses_without_both_keys():
    keys, _ = keypair("agents.test")
    with pytest.raises(SigningError):
        sign_message(MESSAGE, keys[:1])
    with pytest.raises(SigningError):
        sign_message(MESSAGE, [])
    with pytest.raises(SigningError):
        sign_message(b"To: x@y\r\n\r\nno from\r\n", keys)


def test_openssl_rsa_signing_gives_dkimpys_bytes():
    import hashlib

    import dkim.crypto

    from smtpd_agent.auth.adapters import rsa_pkcs1_v1_5_sign
    keys, _ = keypair("agents.test")
    pem = keys[0].dkimpy_private_key()
    private = dkim.crypto.parse_pem_private_key(pem)
    for data in (b"", b"one header set", MESSAGE):
        digest = hashlib.sha256(data)
        assert rsa_pkcs1_v1_5_sign(digest, private) == \
            dkim.crypto.RSASSA_PKCS1_v1_5_sign(hashlib.sha256(data), private)


@pytest.mark.parametrize("message, feedback", [
    (json.dumps({"notificationType": "Bounce"}), True),
    (json.dumps({"eventType": "Complaint"}), True),
    (json.dumps({"notificationType": "Delivery"}), True),
    (json.dumps({"notificationType": "Received"}), False),
    ("not json", False),
    ("[]", False),
])
def test_is_ses_feedback(message, feedback):
    from smtpd_agent.outbound.dsn import is_ses_feedback
    assert is_ses_feedback(message) is feedback
