"""Record sets and DKIM keys, without a database: what we ask DNS to say, and key handling."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path

import dkim
import dns.resolver
import jsonschema
import pytest
from structlog.testing import capture_logs

from smtpd_agent.config import ConfigError, load_settings
from smtpd_agent.dns import parse_nameserver
from smtpd_agent.domains.check import dkim_tags
from smtpd_agent.domains.keys import (
    DkimKey,
    KeyStoreError,
    SigningKey,
    generate,
    load_secret,
    selector_for,
)
from smtpd_agent.domains.records import custom_domain_records, default_domain_records
from tests.dnsserver import DnsTestServer

SCHEMA = json.loads((resources.files("smtpd_agent.domains") / "records.schema.json").read_text())


def settings(tmp_path: Path, **overrides: object):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return load_settings(path=empty, env={}, overrides={"server.default_domain": "aexy.email",
                                                        **overrides})


def key(algorithm: str, public: str, domain: str = "mail.acme.com") -> DkimKey:
    return DkimKey(1, 1, domain, selector_for("sa", algorithm, datetime(2026, 11, 21), 0),  # type: ignore[arg-type]
                   algorithm, public, datetime.now(UTC), None)  # type: ignore[arg-type]


def test_custom_record_set_zone_snippet_and_schema(tmp_path: Path) -> None:
    s = settings(tmp_path, **{"domains.dmarc_rua": "mailto:dmarc@aexy.email",
                              "domains.mx_backup": "mx-backup.example.net"})
    rsa_public = generate("rsa-2048")[1]
    keys = [key("rsa-2048", rsa_public), key("ed25519", generate("ed25519")[1])]
    record_set = custom_domain_records(s, "mail.acme.com", "acme", "pending", "tok", keys)
    jsonschema.validate(record_set.to_dict(), SCHEMA)
    zone = record_set.zone_snippet()
    assert "mail.acme.com.\t3600\tIN\tMX\t10 mx1.aexy.email." in zone
    assert "mail.acme.com.\t3600\tIN\tMX\t20 mx-backup.example.net." in zone
    assert 'mail.mail.acme.com.\t3600\tIN\tTXT\t"v=spf1 include:_spf.aexy.email -all"' in zone
    assert ('_dmarc.mail.acme.com.\t3600\tIN\tTXT\t'
            '"v=DMARC1; p=quarantine; rua=mailto:dmarc@aexy.email"') in zone
    assert '_smtpd-agent.mail.acme.com.\t3600\tIN\tTXT\t"smtpd-agent-verification=tok"' in zone
    # an RSA-2048 key is longer than one TXT character-string: split, not truncated
    rsa_line = next(line for line in zone.splitlines() if "sa-20261121-rsa._domainkey" in line)
    assert rsa_line.count('"') >= 4 and rsa_line.endswith(" )")
    joined = "".join(part for part in rsa_line.split('"')[1::2])
    assert dkim_tags(joined)["p"] == rsa_public


def test_default_record_set_has_wildcards_and_report_authorization(tmp_path: Path) -> None:
    s = settings(tmp_path, **{"domains.dmarc_rua": "mailto:dmarc@aexy.email",
                              "domains.spf_mechanisms": "ip4:192.0.2.0/24,include:amazonses.com"})
    record_set = default_domain_records(s, [key("ed25519", generate("ed25519")[1], "aexy.email")])
    jsonschema.validate(record_set.to_dict(), SCHEMA)
    records = {(r.name, r.type, r.value) for r in record_set.records}
    assert ("*.aexy.email", "MX", "mx1.aexy.email") in records
    assert ("_spf.aexy.email", "TXT",
            "v=spf1 ip4:192.0.2.0/24 include:amazonses.com -all") in records
    assert ("*.aexy.email", "TXT", "v=spf1 include:_spf.aexy.email -all") in records
    assert ("bounce.aexy.email", "MX", "mx2.aexy.email") in records
    assert ("_dmarc.aexy.email", "TXT",
            "v=DMARC1; p=quarantine; sp=quarantine; rua=mailto:dmarc@aexy.email") in records
    assert ("*._report._dmarc.aexy.email", "TXT", "v=DMARC1") in records


def test_schema_rejects_what_it_should(tmp_path: Path) -> None:
    record_set = custom_domain_records(settings(tmp_path), "mail.acme.com", "acme", "pending",
                                       "tok", []).to_dict()
    bad = json.loads(json.dumps(record_set))
    bad["records"][0].pop("priority")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)
    bad = json.loads(json.dumps(record_set))
    bad["records"].append({**bad["records"][-1], "private_key": "x"})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SCHEMA)


@pytest.mark.parametrize("key_name, value", [
    ("domains.dmarc_rua", "dmarc@aexy.email"),
    ("domains.mail_from_label", "Mail.From"),
    ("domains.mx_primary", "MX1 example"),
    ("domains.dmarc_policy", "bounce"),
])
def test_bad_domain_settings_name_the_key(tmp_path: Path, key_name: str, value: str) -> None:
    with pytest.raises(ConfigError) as error:
        settings(tmp_path, **{key_name: value})
    assert str(error.value).startswith(key_name + ":")


def test_key_secret_is_created_private_and_refused_when_others_can_read_it(tmp_path: Path) -> None:
    path = tmp_path / "state" / "dkim.secret"
    cipher = load_secret(path)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert load_secret(path).decrypt(cipher.encrypt(b"x")) == b"x"  # same secret next time
    os.chmod(path, 0o644)
    with pytest.raises(KeyStoreError, match="readable by others"):
        load_secret(path)
    with pytest.raises(KeyStoreError, match="does not exist"):
        load_secret(tmp_path / "missing", create=False)


def test_signing_keys_sign_and_verify_with_dkimpy_against_the_published_record(
        dns_server: DnsTestServer) -> None:
    """What outbound signing will do: both algorithms, verified over loopback DNS."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [parse_nameserver(dns_server.nameserver)]
    resolver.lifetime = 2.0

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        answer = resolver.resolve(name.decode().rstrip("."), "TXT")
        return b"".join(b"".join(r.strings) for r in answer)

    message = (b"From: support@mail.acme.com\r\nTo: bob@example.org\r\nSubject: hi\r\n"
               b"Message-ID: <k@mail.acme.com>\r\n\r\nhello\r\n")
    for algorithm in ("rsa-2048", "ed25519"):
        private, public = generate(algorithm)  # type: ignore[arg-type]
        published = key(algorithm, public)
        dns_server.txt(published.name, published.txt)
        signing = SigningKey(published.domain, published.selector, algorithm, private)  # type: ignore[arg-type]
        assert private.hex() not in repr(signing) and "private" not in repr(signing)
        with capture_logs() as logs:
            signature = dkim.sign(message, signing.selector.encode(), signing.domain.encode(),
                                  signing.dkimpy_private_key(),
                                  signature_algorithm=signing.dkimpy_algorithm)
        assert not logs
        assert dkim.verify(signature + message, dnsfunc=dnsfunc), algorithm
