"""Settings: file, environment, flags; invalid values stop start-up naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smtpd_agent.config import ConfigError, env_name, known_keys, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_documented_config_file_lists_every_key_with_its_default():
    path = REPO / "config" / "smtpd-agent.toml"
    defaults = load_settings(path=path, env={})
    text = path.read_text()
    for key in known_keys():
        section, name = key.split(".")
        assert f"[{section}]" in text, section
        assert f"\n{name} =" in text or f"\n# {name} =" in text, key
    assert defaults.smtp.port == 2525 and defaults.database.url == ""


def test_environment_overrides_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[smtp]\nport = 2600\n[dns]\nnameservers = ["10.0.0.1"]\n')
    settings = load_settings(path=path, env={
        "SMTPD_AGENT_SMTP_PORT": "2700", "SMTPD_AGENT_DNS_NAMESERVERS": "127.0.0.1:5353, ::1",
        "DATABASE_URL": "postgresql://u@h/db", "SMTPD_AGENT_SMTP_REQUIRE_STARTTLS": "false"})
    assert settings.smtp.port == 2700
    assert settings.dns.nameservers == ["127.0.0.1:5353", "::1"]
    assert settings.database.url == "postgresql://u@h/db"
    flagged = load_settings(path=path, env={}, overrides={"smtp.port": 2800})
    assert flagged.smtp.port == 2800


@pytest.mark.parametrize("env, key", [
    ({"SMTPD_AGENT_SMTP_PORT": "twenty"}, "smtp.port"),
    ({"SMTPD_AGENT_SMTP_PORT": "70000"}, "smtp.port"),
    ({"SMTPD_AGENT_SMTP_BARE_LF": "ignore"}, "smtp.bare_lf"),
    ({"SMTPD_AGENT_SMTP_REQUIRE_STARTTLS": "maybe"}, "smtp.require_starttls"),
    ({"SMTPD_AGENT_SMTP_MAX_RECIPIENTS": "0"}, "smtp.max_recipients"),
    ({"SMTPD_AGENT_SMTP_PROCESSES": "-1"}, "smtp.processes"),
    ({"SMTPD_AGENT_SMTP_PROCESSES": "65"}, "smtp.processes"),
    ({"SMTPD_AGENT_ROUTING_POSTMASTER": "ops"}, "routing.postmaster"),
    ({"SMTPD_AGENT_STORE_COMMITTERS": "0"}, "store.committers"),
    ({"SMTPD_AGENT_STORE_COMMITTERS": "10"}, "store.committers"),
    ({"SMTPD_AGENT_STORE_BATCH_MAX": "0"}, "store.batch_max"),
    ({"SMTPD_AGENT_STORE_SEARCH_MAX_DELAY": "0.1"}, "store.search_max_delay"),
    ({"SMTPD_AGENT_STORE_SEARCH_MAX_DELAY": "7200"}, "store.search_max_delay"),
    ({"SMTPD_AGENT_SERVER_DEFAULT_DOMAIN": "NoDots"}, "server.default_domain"),
    ({"DATABASE_URL": "mysql://x"}, "database.url"),
    ({"SMTPD_AGENT_SCAN_CLAMD": "/run/clamd.sock"}, "scan.clamd"),
    ({"SMTPD_AGENT_DNS_SERVER_LISTEN": "0.0.0.0"}, "dns_server.listen"),
    ({"SMTPD_AGENT_DNS_SERVER_NAMESERVERS": "NS1.Example.com"}, "dns_server.nameservers"),
    ({"SMTPD_AGENT_DNS_SERVER_GLUE": "ns1.example.com=not-an-ip"}, "dns_server.glue"),
    ({"SMTPD_AGENT_DNS_SERVER_UDP_PAYLOAD": "100"}, "dns_server.udp_payload"),
    ({"SMTPD_AGENT_MTA_STS_MODE": "strict"}, "mta_sts.mode"),
    ({"SMTPD_AGENT_MTA_STS_MAX_AGE": "0"}, "mta_sts.max_age"),
    ({"SMTPD_AGENT_MTA_STS_TLSRPT_RUA": "tls@example.com"}, "mta_sts.tlsrpt_rua"),
    ({"SMTPD_AGENT_SMTP_TLS_CERT": "/nonexistent.pem", "SMTPD_AGENT_SMTP_TLS_KEY": "/x"},
     "smtp.tls_cert"),
    ({"SMTPD_AGENT_HTTP_WEBHOOK_CONCURRENCY": "0"}, "http.webhook_concurrency"),
    ({"SMTPD_AGENT_HTTP_WEBHOOK_MAX_BODY_SIZE": "-1"}, "http.webhook_max_body_size"),
    ({"SMTPD_AGENT_HTTP_SNS_MAX_AGE": "0"}, "http.sns_max_age"),
    ({"SMTPD_AGENT_HTTP_SNS_CA_FILE": "/nonexistent.pem"}, "http.sns_ca_file"),
    ({"SMTPD_AGENT_RETENTION_BATCH_SIZE": "0"}, "retention.batch_size"),
    ({"SMTPD_AGENT_RETENTION_EVENTS_DAYS": "-1"}, "retention.events_days"),
    ({"SMTPD_AGENT_RETENTION_EVENTS_DAYS": "1.5"}, "retention.events_days"),
    ({"SMTPD_AGENT_RETENTION_WEBHOOK_FAILED_DAYS": "40000"}, "retention.webhook_failed_days"),
    ({"SMTPD_AGENT_RETENTION_INTERVAL": "-5"}, "retention.interval"),
])
def test_invalid_values_name_the_key(tmp_path, env, key):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    with pytest.raises(ConfigError) as error:
        load_settings(path=empty, env=env)
    assert str(error.value).startswith(key + ":")


def test_smtp_processes_default_to_one_per_usable_cpu_at_most_four(tmp_path):
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    cpus = len(os.sched_getaffinity(0))
    assert load_settings(path=empty, env={}).smtp.processes == min(cpus, 4)
    assert load_settings(path=REPO / "config" / "smtpd-agent.toml",
                         env={}).smtp.processes == min(cpus, 4)
    assert load_settings(path=empty, env={"SMTPD_AGENT_SMTP_PROCESSES": "1"}).smtp.processes == 1
    assert load_settings(path=empty, env={"SMTPD_AGENT_SMTP_PROCESSES": "6"}).smtp.processes == 6


def test_unknown_key_in_file_is_an_error(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[smtp]\nprot = 25\n")
    with pytest.raises(ConfigError, match=r"^smtp\.prot: unknown setting"):
        load_settings(path=path, env={})


def test_env_names_follow_the_scheme():
    assert env_name("dns.nameservers") == "SMTPD_AGENT_DNS_NAMESERVERS"
    assert env_name("smtp.max_message_size") == "SMTPD_AGENT_SMTP_MAX_MESSAGE_SIZE"


def test_serve_with_invalid_config_prints_one_line_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "smtpd_agent", "serve", "--state-dir", str(tmp_path)],
        env={"SMTPD_AGENT_SMTP_PORT": "twenty", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=60, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "smtp.port" in result.stderr


def test_reload_applies_live_keys_and_names_the_rest(tmp_path):
    from smtpd_agent.config import apply_live, is_live
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    current = load_settings(path=empty, env={})
    new = load_settings(path=empty, env={
        "SMTPD_AGENT_SMTP_MAX_RECIPIENTS": "5", "SMTPD_AGENT_AUTH_SPF_FAIL": "reject",
        "SMTPD_AGENT_SMTP_PORT": "25", "SMTPD_AGENT_DNS_TIMEOUT": "1",
        "SMTPD_AGENT_LOG_LEVEL": "debug", "SMTPD_AGENT_LOG_FORMAT": "json"})
    merged, restart = apply_live(current, new)
    assert merged.smtp.max_recipients == 5 and merged.auth.spf_fail == "reject"
    assert merged.log.level == current.log.level
    assert merged.smtp.port == current.smtp.port and merged.dns.timeout == current.dns.timeout
    assert sorted(restart) == ["dns.timeout", "log.format", "log.level", "smtp.port"]
    assert is_live("smtp.tls_cert") and is_live("scan.clamd") and not is_live("database.url")


def test_migration_numbers_are_unique() -> None:
    """schema_migrations is keyed by the number: a second file with the same one never runs."""
    from smtpd_agent.store.database import migration_files

    versions = [version for version, _, _ in migration_files()]
    assert versions == sorted(set(versions))
