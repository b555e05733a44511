"""Domains end to end: `dns-records` and `domain add` output published into the loopback DNS
server, `domain check` against it, verification, routing to custom domains over real SMTP,
and the periodic re-check. Real Postgres, real DNS on loopback, the real CLI handlers."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg
import jsonschema
import pytest
from structlog.testing import capture_logs

from smtpd_agent.runtime import Runtime
from smtpd_agent.cli import build_parser, with_database
from smtpd_agent.config import Settings
from smtpd_agent.domains import Domains, open_key_store
from smtpd_agent.domains.keys import KeyStore, KeyStoreError
from smtpd_agent.domains.service import DomainRechecker
from smtpd_agent.smtp import replies
from smtpd_agent.store import directory
from tests.dnsserver import DnsTestServer
from tests.support import DEFAULT_DOMAIN, ServerThread, enhanced, make_settings

CUSTOM = "mail.acme.example"
SCHEMA = json.loads((resources.files("smtpd_agent.domains") / "records.schema.json").read_text())


class Cli:
    """The real command handlers with a test's settings, stdout captured."""

    def __init__(self, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
        self.settings = settings
        self.capsys = capsys

    async def __call__(self, *argv: str) -> tuple[int, str]:
        args = build_parser().parse_args(list(argv))
        self.capsys.readouterr()
        with capture_logs():  # keep log lines (structlog's default: stdout) out of the output
            code = await with_database(self.settings, args.handler, args)
        return code, self.capsys.readouterr().out

    async def json(self, *argv: str) -> Any:
        code, out = await self(*argv, "--json")
        assert code in (0, 1), out  # `domain check` answers 1 when a record fails
        return json.loads(out)


def settings_for(database_url: str, state: Path, dns: DnsTestServer, **overrides: Any) -> Settings:
    values = {"dns.nameservers": [dns.nameserver],
              "domains.dmarc_rua": f"mailto:dmarc@{DEFAULT_DOMAIN}", **overrides}
    return make_settings(database_url, state, **values)


@pytest.fixture
def cli(database_url: str, tmp_path: Path, dns_server: DnsTestServer,
        capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(settings_for(database_url, tmp_path / "cli", dns_server), capsys)


def publish(dns: DnsTestServer, record_set: dict[str, Any]) -> None:
    for record in record_set["records"]:
        value = (record["priority"], record["value"]) if record["type"] == "MX" else record["value"]
        dns.add(record["name"], record["type"], value)


async def publish_default(dns: DnsTestServer, cli: Cli) -> dict[str, Any]:
    """The operator's records (the SPF include every domain points at) and its MX hosts' A."""
    default = await cli.json("dns-records")
    jsonschema.validate(default, SCHEMA)
    publish(dns, default)
    dns.a(f"mx1.{DEFAULT_DOMAIN}", "192.0.2.1")
    dns.a(f"mx2.{DEFAULT_DOMAIN}", "192.0.2.2")
    return default


async def add_and_publish(dns: DnsTestServer, cli: Cli, domain: str,
                          workspace: str) -> dict[str, Any]:
    added = await cli.json("domain", "add", domain, "--workspace", workspace)
    jsonschema.validate(added, SCHEMA)
    publish(dns, added)
    return added


@pytest.fixture
async def workspaces(db: asyncpg.Connection, cli: Cli) -> None:
    await cli("migrate")
    await directory.add_workspace(db, "acme", "Acme Inc")
    await directory.add_workspace(db, "globex", "Globex")


async def test_published_records_verify_and_a_removed_dkim_key_is_named(
        cli: Cli, dns_server: DnsTestServer, workspaces: None) -> None:
    default = await publish_default(dns_server, cli)
    kinds = {(r["purpose"], r["type"], r["name"]) for r in default["records"]}
    assert ("mx", "MX", f"*.{DEFAULT_DOMAIN}") in kinds
    assert ("spf", "TXT", f"*.{DEFAULT_DOMAIN}") in kinds
    assert ("spf", "TXT", DEFAULT_DOMAIN) in kinds
    assert ("mail-from-mx", "MX", f"bounce.{DEFAULT_DOMAIN}") in kinds
    assert ("dmarc", "TXT", f"_dmarc.{DEFAULT_DOMAIN}") in kinds
    assert sorted(r["value"].split(";")[1].strip() for r in default["records"]
                  if r["purpose"] == "dkim") == ["k=ed25519", "k=rsa"]
    # the default domain's keys are made once, then reused
    assert (await cli.json("dns-records"))["records"] == default["records"]
    code, out = await cli("dns-records", "--check")
    assert code == 0 and out.strip().endswith(f"{DEFAULT_DOMAIN}: all records published"), out
    dns_server.remove(f"_spf.{DEFAULT_DOMAIN}")
    code, out = await cli("dns-records", "--check")
    assert code == 1 and f"FAIL      TXT   _spf.{DEFAULT_DOMAIN}  " in out, out
    publish(dns_server, {"records": [r for r in default["records"]
                                     if r["name"] == f"_spf.{DEFAULT_DOMAIN}"]})

    added = await add_and_publish(dns_server, cli, CUSTOM, "acme")
    assert (added["domain"], added["workspace"], added["state"]) == (CUSTOM, "acme", "pending")
    by_purpose: dict[str, list[dict[str, Any]]] = {}
    for record in added["records"]:
        by_purpose.setdefault(record["purpose"], []).append(record)
    assert [(r["priority"], r["value"]) for r in by_purpose["mx"]] == [
        (10, f"mx1.{DEFAULT_DOMAIN}"), (20, f"mx2.{DEFAULT_DOMAIN}")]
    assert {r["name"] for r in by_purpose["mail-from-mx"] + by_purpose["mail-from-spf"]} == {
        f"mail.{CUSTOM}"}
    assert by_purpose["dmarc"][0]["value"] == (f"v=DMARC1; p=quarantine; "
                                               f"rua=mailto:dmarc@{DEFAULT_DOMAIN}")
    assert len(by_purpose["dkim"]) == 2 and by_purpose["ownership"][0]["name"] == (
        f"_smtpd-agent.{CUSTOM}")

    code, out = await cli("domain", "check", CUSTOM)
    assert code == 0, out
    lines = out.strip().splitlines()
    checked = [r for r in added["records"] if r["publisher"] == "customer"]
    assert len(lines) == len(checked) + 1
    assert all(line.startswith("PASS") for line in lines[:-1]), out
    assert lines[-1] == f"{CUSTOM}: verified (all required records pass)"
    [listed] = await cli.json("domain", "list")
    assert (listed["domain"], listed["state"], listed["failing"]) == (CUSTOM, "verified", [])

    rsa = next(r for r in by_purpose["dkim"] if "k=rsa" in r["value"])
    dns_server.remove(rsa["name"], "TXT")
    code, out = await cli("domain", "check", CUSTOM)
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1, out
    assert f"TXT   {rsa['name']}" in failed[0]
    assert "no DKIM key record at this selector" in failed[0]
    assert f'fix: publish TXT {rsa["name"]} "{rsa["value"]}"' in failed[0]
    report = await cli.json("domain", "check", CUSTOM)
    assert report["state"] == "degraded" and not report["passed"]
    assert [r["name"] for r in report["records"] if r["status"] == "fail"] == [rsa["name"]]


async def test_broken_spf_and_malformed_dmarc_are_explained(
        cli: Cli, dns_server: DnsTestServer, workspaces: None) -> None:
    await publish_default(dns_server, cli)
    await add_and_publish(dns_server, cli, CUSTOM, "acme")
    # 11 includes: one over RFC 7208's limit of 10 DNS lookups
    includes = [f"i{n}.spf.acme.example" for n in range(11)]
    for name in includes:
        dns_server.txt(name, "v=spf1 ip4:192.0.2.9 -all")
    dns_server.remove(CUSTOM, "TXT")
    dns_server.txt(CUSTOM, "v=spf1 " + " ".join(f"include:{n}" for n in includes) + " -all")
    # two SPF records at the Mail-From subdomain
    dns_server.txt(f"mail.{CUSTOM}", "v=spf1 ip4:192.0.2.10 -all")
    # a DMARC record with a policy that does not exist
    dns_server.remove(f"_dmarc.{CUSTOM}")
    dns_server.txt(f"_dmarc.{CUSTOM}", "v=DMARC1; p=bounce; rua=mailto:dmarc@agents.test")

    report = await cli.json("domain", "check", CUSTOM)
    failures = {(r["name"], r["purpose"]): r for r in report["records"] if r["status"] == "fail"}
    assert set(failures) == {(CUSTOM, "spf"), (f"mail.{CUSTOM}", "mail-from-spf"),
                             (f"_dmarc.{CUSTOM}", "dmarc")}, failures
    # checkdmarc resolved the includes itself, through the loopback server, not the network
    asked = {name for _, name, _ in dns_server.queries}
    assert set(includes[:10]) <= asked
    lookups = failures[(CUSTOM, "spf")]
    assert "needs 11 DNS lookups" in lookups["problem"] and "allows 10" in lookups["problem"]
    assert f"keep include:_spf.{DEFAULT_DOMAIN}" in lookups["fix"]
    two = failures[(f"mail.{CUSTOM}", "mail-from-spf")]
    assert two["problem"].startswith("2 SPF records: RFC 7208 3.2 allows one")
    assert "merge them into one" in two["fix"]
    dmarc = failures[(f"_dmarc.{CUSTOM}", "dmarc")]
    assert dmarc["problem"].startswith("invalid DMARC record:") and "bounce" in dmarc["problem"]
    assert dmarc["fix"] == ('replace it with '
                            f'"v=DMARC1; p=quarantine; rua=mailto:dmarc@{DEFAULT_DOMAIN}"')
    assert report["state"] == "pending"  # never verified: failures do not make it degraded

    # a syntactically broken record is named as such too
    dns_server.remove(f"_dmarc.{CUSTOM}")
    dns_server.txt(f"_dmarc.{CUSTOM}", "v=DMARC1; p=reject; adkim=x; fo=9")
    report = await cli.json("domain", "check", CUSTOM)
    [dmarc] = [r for r in report["records"] if r["purpose"] == "dmarc"]
    assert dmarc["status"] == "fail" and dmarc["problem"].startswith("invalid DMARC record:")


async def test_mail_to_a_verified_custom_domain_lands_in_its_workspace_pending_is_refused(
        server: ServerThread, db: asyncpg.Connection, database_url: str, tmp_path: Path,
        dns_server: DnsTestServer, capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server), capsys)
    await publish_default(dns_server, cli)
    await add_and_publish(dns_server, cli, CUSTOM, "acme")
    assert (await cli("domain", "check", CUSTOM))[0] == 0
    await cli.json("domain", "add", "mail.globex.example", "--workspace", "globex")  # unpublished

    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("alice@example.org")
    assert (await smtp.rcpt(f"Support+orders@{CUSTOM}")).code == 250
    with capture_logs() as logs, pytest.raises(aiosmtplib.SMTPRecipientRefused) as refused:
        await smtp.rcpt("support@mail.globex.example")
    assert refused.value.code == replies.RELAY_DENIED.code
    assert enhanced(f"550 {refused.value.message}".encode()) == "5.7.1"
    [event] = [e for e in logs if e["event"] == "smtp.rcpt_rejected"]
    assert event["reason"] == "domain pending"
    assert "smtpd-agent domain check mail.globex.example" in event["hint"]
    await smtp.data(b"From: alice@example.org\r\nTo: support@" + CUSTOM.encode() +
                    b"\r\nSubject: custom domain\r\nMessage-ID: <c1@example.org>\r\n\r\nhi\r\n")
    await smtp.quit()

    row = await db.fetchrow(
        """SELECT w.slug, a.handle, m.rcpt_to FROM messages m
           JOIN agents a ON a.id = m.agent_id JOIN workspaces w ON w.id = m.workspace_id
           WHERE m.subject = 'custom domain'""")
    assert (row["slug"], row["handle"]) == ("acme", "support")
    assert CUSTOM in row["rcpt_to"].lower()

    # a record broke after setup: degraded, and mail keeps arriving (we warn, we do not bounce)
    dns_server.remove(f"_smtpd-agent.{CUSTOM}")
    assert (await cli.json("domain", "check", CUSTOM))["state"] == "degraded"
    await asyncio.sleep(server.settings.routing.cache_ttl + 0.1)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=server.port)
    await smtp.connect()
    await smtp.ehlo()
    await smtp.mail("alice@example.org")
    assert (await smtp.rcpt(f"sales@{CUSTOM}")).code == 250
    await smtp.quit()


async def test_periodic_recheck_marks_a_broken_domain_degraded_and_names_the_record(
        cli: Cli, dns_server: DnsTestServer, workspaces: None) -> None:
    await publish_default(dns_server, cli)
    await add_and_publish(dns_server, cli, CUSTOM, "acme")
    assert (await cli("domain", "check", CUSTOM))[0] == 0
    dns_server.remove(CUSTOM, "MX")
    dns_server.add(CUSTOM, "MX", (10, f"mx1.{DEFAULT_DOMAIN}"))  # the backup MX is gone

    runtime = await Runtime.open(cli.settings)
    try:
        with capture_logs() as logs:
            [checked] = await DomainRechecker(runtime).run_once()
    finally:
        await runtime.close()
    assert checked.state == "degraded"
    assert checked.failing == [f"MX {CUSTOM}"]
    degraded = [e for e in logs if e["event"] == "domain.degraded"]
    assert degraded and degraded[0]["failing"] == [f"MX {CUSTOM}"]
    assert not any("private" in json.dumps(e, default=str).lower() for e in logs)

    dns_server.add(CUSTOM, "MX", (20, f"mx2.{DEFAULT_DOMAIN}"))
    code, out = await cli("domain", "check", CUSTOM)
    assert code == 0 and out.strip().endswith(f"{CUSTOM}: verified (all required records pass)")

    # a DNS outage says nothing about the records: temperror, the state stays verified
    dns_server.set_servfail(f"_dmarc.{CUSTOM}")
    report = await cli.json("domain", "check", CUSTOM)
    assert report["state"] == "verified" and not report["passed"]
    assert [r["status"] for r in report["records"] if r["purpose"] == "dmarc"] == ["temperror"]


async def test_hosted_dkim_keys_are_cnames_and_domain_remove_forgets_everything(
        database_url: str, tmp_path: Path, dns_server: DnsTestServer, db: asyncpg.Connection,
        capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(settings_for(database_url, tmp_path / "cli", dns_server,
                           **{"domains.dkim_hosted_zone": f"dkim.{DEFAULT_DOMAIN}"}), capsys)
    await cli("migrate")
    await directory.add_workspace(db, "acme")
    await publish_default(dns_server, cli)
    added = await add_and_publish(dns_server, cli, CUSTOM, "acme")
    # (mta-sts.<domain> is a CNAME too, to the MTA-STS policy host: not a key)
    cnames = [r for r in added["records"] if r["type"] == "CNAME"
              and r["purpose"] != "mta-sts-host"]
    hosted = [r for r in added["records"] if r["publisher"] == "operator"]
    assert len(cnames) == 2 and all(r["purpose"] == "dkim" for r in cnames)
    assert {r["value"] for r in cnames} == {r["name"] for r in hosted}
    assert all(r["value"].endswith(f"._domainkey.{CUSTOM}.dkim.{DEFAULT_DOMAIN}") for r in cnames)
    code, out = await cli("domain", "check", CUSTOM)
    assert code == 0 and out.count("(operator, not required)") == 2, out
    # the operator forgot to serve a hosted key: shown, the customer's verification stands
    dns_server.remove(hosted[0]["name"])
    report = await cli.json("domain", "check", CUSTOM)
    assert report["passed"] and report["state"] == "verified"
    [missing] = [r for r in report["records"] if r["status"] == "fail"]
    assert missing["name"] == hosted[0]["name"]
    assert missing["fix"].startswith("the operator (not the domain's owner) must publish TXT")

    duplicate = build_parser().parse_args(["domain", "add", CUSTOM, "--workspace", "acme"])
    with pytest.raises(directory.DirectoryError, match="already registered"):
        await with_database(cli.settings, duplicate.handler, duplicate)
    # private keys: encrypted at rest, never in any output
    store = open_key_store(db, cli.settings)
    workspace_id = await db.fetchval("SELECT id FROM workspaces WHERE slug = 'acme'")
    signing = await store.signing_keys(workspace_id, CUSTOM)
    assert sorted(k.algorithm for k in signing) == ["ed25519", "rsa-2048"]
    for stored in await db.fetch("SELECT private_key FROM dkim_keys"):
        assert bytes(stored["private_key"]).startswith(b"gAAAAA")  # a Fernet token
    outputs = json.dumps(added) + (await cli("dns-records"))[1] + (await cli("domain", "list"))[1]
    for k in signing:
        secret = k.dkimpy_private_key().decode()
        body = "".join(line for line in secret.splitlines() if "PRIVATE KEY" not in line)
        assert body[:40] not in outputs and k.private_pkcs8.hex()[:40] not in outputs

    # a host without the secret refuses to sign rather than inventing a new secret
    elsewhere = KeyStore(db, cli.settings.server.state_dir / "other" / "dkim.secret", "sa")
    with pytest.raises(KeyStoreError, match="does not exist"):
        await elsewhere.signing_keys(workspace_id, CUSTOM)
    assert not (cli.settings.server.state_dir / "other").exists()

    # what outbound signing asks for: own verified domain yes, another workspace's never
    pool = await asyncpg.create_pool(cli.settings.database.url, min_size=1, max_size=2)
    try:
        domains = Domains.open(pool, cli.settings)
        assert [k.selector for k in await domains.signing_keys_for(workspace_id, CUSTOM)] == [
            k.selector for k in signing]
        other = await db.fetchval("INSERT INTO workspaces (slug, name) VALUES ('evil', 'E') "
                                  "RETURNING id")
        assert await domains.signing_keys_for(other, CUSTOM) == []
        default_keys = await domains.signing_keys_for(other, f"evil.{DEFAULT_DOMAIN}")
        assert {k.domain for k in default_keys} == {DEFAULT_DOMAIN} and len(default_keys) == 2
    finally:
        await pool.close()

    code, out = await cli("domain", "remove", CUSTOM)
    assert code == 0 and "removed" in out
    assert await db.fetchval("SELECT count(*) FROM dkim_keys WHERE domain = $1", CUSTOM) == 0
    assert await cli.json("domain", "list") == []


def test_domain_commands_have_help() -> None:
    for command in (["dns-records"], ["domain", "add"], ["domain", "check"], ["domain", "list"],
                    ["domain", "remove"], ["domain", "rotate-dkim"], ["dns-serve"]):
        with pytest.raises(SystemExit) as done:
            build_parser().parse_args([*command, "--help"])
        assert done.value.code == 0, command


async def test_operator_workspace_owns_default_keys_but_is_no_customer(
        cli: Cli, db: asyncpg.Connection, workspaces: None) -> None:
    await cli("dns-records")
    owners = await db.fetch("""SELECT DISTINCT w.slug, w.operator FROM dkim_keys k
                               JOIN workspaces w ON w.id = k.workspace_id""")
    assert [(r["slug"], r["operator"]) for r in owners] == [("_operator", True)]
    assert [w.slug for w in await directory.list_workspaces(db)] == ["acme", "globex"]
    with pytest.raises(directory.DirectoryError, match="no workspace"):
        await directory.add_agent(db, "_operator", "support")
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("INSERT INTO workspaces (slug, name) VALUES ('_x', 'x')")
