"""config/production.example.toml loads as shipped, once its certificate files exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from smtpd_agent.app import build_tls_context
from smtpd_agent.config import ConfigError, load_settings
from tests.tls import write_self_signed

PRODUCTION = Path(__file__).resolve().parents[2] / "config" / "production.example.toml"


def test_production_config_loads_with_real_certificate_files(tmp_path):
    cert, key = write_self_signed(tmp_path, name="mx1.example.com")
    settings = load_settings(path=PRODUCTION, env={
        # The file's /etc/smtpd-agent/tls paths do not exist here; the environment
        # overrides them exactly as an operator's EnvironmentFile could.
        "SMTPD_AGENT_SMTP_TLS_CERT": str(cert), "SMTPD_AGENT_SMTP_TLS_KEY": str(key),
        "DATABASE_URL": "postgresql://smtpd_agent@db.internal/smtpd_agent"})
    assert settings.smtp.port == 25 and settings.smtp.host == ""
    assert settings.smtp.require_starttls and settings.smtp.bare_lf == "reject"
    assert settings.auth.dmarc_reject and settings.auth.spf_fail == "reject"
    assert settings.auth.temperror == "tempfail"
    assert settings.scan.clamd.startswith("unix:") and settings.scan.required
    assert settings.log.format == "json"
    assert settings.http.host == "127.0.0.1"  # health, metrics, API: never on the internet
    assert settings.smtp.shutdown_grace < 60  # TimeoutStopSec of the systemd unit
    # The only writable place under the unit's ProtectSystem=strict: ReadWritePaths.
    assert settings.domains.key_file.startswith(str(settings.server.state_dir) + "/")
    assert str(settings.server.state_dir) == "/var/lib/smtpd-agent"
    assert build_tls_context(settings.smtp) is not None


def test_production_config_names_real_certificate_paths():
    with pytest.raises(ConfigError, match=r"^smtp\.tls_cert: no such file "
                                          r"/etc/smtpd-agent/tls/fullchain\.pem"):
        load_settings(path=PRODUCTION, env={})
