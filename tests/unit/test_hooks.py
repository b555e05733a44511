"""The pure parts of outgoing webhooks: signatures, the URL and address policy, retries."""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from smtpd_agent.config import WebhookSettings
from smtpd_agent.hooks import signing
from smtpd_agent.hooks.decisions import (DeliveryState, Outcome, after_attempt, backoff,
                                         outcome_of, should_disable)
from smtpd_agent.hooks.targets import Policy, Refused, check_url


def spec_signature(secret: str, message_id: str, timestamp: str, body: bytes) -> str:
    """The specification's algorithm, written out independently of the package."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def test_secret_is_whsec_with_32_random_bytes():
    first, second = signing.new_secret(), signing.new_secret()
    assert first != second
    assert signing.is_secret(first)
    assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
    assert not signing.is_secret("whsec_" + base64.b64encode(b"short").decode())
    assert not signing.is_secret("nope")


def test_headers_follow_the_specification():
    secret = signing.new_secret()
    body = '{"type":"message.received","data":{"subject":"Grüße"}}'.encode()
    when = datetime(2026, 12, 2, 1, 0, 0, tzinfo=UTC)
    headers = signing.headers("evt_42", when, body, [secret])
    assert headers["webhook-id"] == "evt_42"
    assert headers["webhook-timestamp"] == str(int(when.timestamp()))
    assert headers["webhook-signature"] == spec_signature(secret, "evt_42",
                                                          headers["webhook-timestamp"], body)


def test_rotation_signs_with_both_secrets_and_either_verifies():
    new, old = signing.new_secret(), signing.new_secret()
    body = b'{"type":"message.received"}'
    headers = signing.headers("evt_7", datetime.now(UTC), body, [new, old])
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in (new, old):
        assert Webhook(secret).verify(body, headers) == {"type": "message.received"}
    with pytest.raises(WebhookVerificationError):
        Webhook(signing.new_secret()).verify(body, headers)
    tampered = dict(headers, **{"webhook-id": "evt_8"})
    with pytest.raises(WebhookVerificationError):
        Webhook(new).verify(body, tampered)


STRICT = Policy()
LOOPBACK = Policy(allow_loopback=True)


@pytest.mark.parametrize("url", [
    "https://hooks.example.com/in", "https://hooks.example.com:8443/a?b=c",
    "https://93.184.215.14/x", "https://[2606:4700::1111]/x"])
def test_public_https_urls_are_taken(url):
    assert check_url(url, STRICT) == url


@pytest.mark.parametrize(("url", "why"), [
    ("http://hooks.example.com/", "https is required"),
    ("ftp://hooks.example.com/", "https is required"),
    ("https://user:pw@hooks.example.com/", "no user or password"),
    ("https://hooks.example.com/#frag", "no fragment"),
    ("https:///path", "no host"),
    ("https://hooks.example.com:99999/", "url:"),
    ("https://hooks example.com/", "no spaces"),
    ("https://a..b/", "not a valid host name"),
    ("https://localhost/", "localhost"),
    ("https://127.0.0.1/", "loopback"),
    ("https://[::1]/", "loopback"),
    ("https://10.1.2.3/", "private"),
    ("https://192.168.0.10/", "private"),
    ("https://172.16.5.5/", "private"),
    ("https://169.254.169.254/latest/meta-data/", "link-local"),
    ("https://[fe80::1]/", "link-local"),
    ("https://[fd00:ec2::254]/", "private"),
    ("https://[::ffff:169.254.169.254]/", "link-local"),
    ("https://0.0.0.0/", "unspecified"),
    ("https://224.0.0.1/", "multicast"),
    ("https://100.64.0.1/", "private|not a global"),
    ("https://" + "a" * 2100 + ".com/", "characters"),
    # IPv6 that a NAT64 gateway, a 6to4 relay or Teredo turns into a private address
    ("https://[64:ff9b::a9fe:a9fe]/", "carries 169.254.169.254"),
    ("https://[2002:a00:1::1]/", "carries 10.0.0.1"),
    # spellings getaddrinfo reads as 127.0.0.1 though ipaddress does not
    ("https://2130706433/", "canonical"),
    ("https://127.1/", "canonical"),
    ("https://0177.0.0.1/", "canonical"),
    ("https://0x7f.0.0.1/", "canonical"),
    ("https://127.0.0.1./", "canonical"),
])
def test_hostile_urls_are_refused(url, why):
    with pytest.raises(Refused, match=why):
        check_url(url, STRICT)


def test_loopback_only_with_the_flag_and_http_only_to_loopback():
    assert check_url("http://127.0.0.1:8080/hook", LOOPBACK)
    assert check_url("http://localhost:8080/hook", LOOPBACK)
    with pytest.raises(Refused, match="https is required"):
        check_url("http://hooks.example.com/", LOOPBACK)
    with pytest.raises(Refused, match="private"):
        check_url("https://10.0.0.1/", LOOPBACK)  # the flag admits loopback only


def test_nat64_admitted_by_network_still_judges_the_embedded_address():
    policy = Policy.of(False, ["64:ff9b::/96"])
    assert policy.address_problem("64:ff9b::5db8:d70e") is None
    assert "carries 10.0.0.1" in (policy.address_problem("64:ff9b::a00:1") or "")


def test_allowed_networks_admit_chosen_private_ranges():
    policy = Policy.of(False, ["10.20.0.0/16"])
    assert policy.address_problem("10.20.3.4") is None
    assert "private" in (policy.address_problem("10.21.0.1") or "")
    assert "link-local" in (policy.address_problem("169.254.169.254") or "")
    assert policy.address_problem("8.8.8.8") is None


SETTINGS = WebhookSettings(retry_base=30, retry_max=7200, give_up_after=86400,
                           disable_after_failures=3, disable_after_seconds=60)


def test_backoff_doubles_to_the_cap():
    assert [backoff(n, SETTINGS) for n in range(1, 10)] == [
        30, 60, 120, 240, 480, 960, 1920, 3840, 7200]
    assert backoff(200, SETTINGS) == 7200


def test_the_default_schedule_spans_about_a_day():
    settings = WebhookSettings()
    age, attempt = 0.0, 1
    while (step := after_attempt(Outcome.FAILED, attempt, age, settings)).retry_in is not None:
        age += step.retry_in
        attempt += 1
    assert step.state is DeliveryState.FAILED and step.give_up
    assert 15 <= attempt <= 30
    assert 18 * 3600 <= age <= 24 * 3600


@pytest.mark.parametrize(("status", "refused", "outcome"), [
    (200, False, Outcome.DELIVERED), (204, False, Outcome.DELIVERED),
    (301, False, Outcome.FAILED), (410, False, Outcome.FAILED), (500, False, Outcome.FAILED),
    (None, False, Outcome.FAILED), (None, True, Outcome.REFUSED)])
def test_outcomes(status, refused, outcome):
    assert outcome_of(status, refused) is outcome


def test_after_attempt_retries_then_gives_up():
    assert after_attempt(Outcome.DELIVERED, 5, 10, SETTINGS).state is DeliveryState.DELIVERED
    retry = after_attempt(Outcome.FAILED, 1, 0, SETTINGS)
    assert retry.state is DeliveryState.PENDING and retry.retry_in == 30
    assert after_attempt(Outcome.REFUSED, 2, 0, SETTINGS).retry_in == 60
    done = after_attempt(Outcome.FAILED, 9, 86400 - 100, SETTINGS)
    assert done.state is DeliveryState.FAILED and done.give_up


def test_disable_needs_both_count_and_time():
    now = datetime.now(UTC)
    assert not should_disable(2, now - timedelta(hours=1), now, SETTINGS)
    assert not should_disable(3, now - timedelta(seconds=10), now, SETTINGS)
    assert should_disable(3, now - timedelta(seconds=60), now, SETTINGS)
    assert not should_disable(100, None, now, SETTINGS)
    never = WebhookSettings(disable_after_failures=0)
    assert not should_disable(10**6, now - timedelta(days=30), now, never)
