"""One typed settings object: `config/smtpd-agent.toml`, then the environment.

Every key `section.key` of the file can be overridden by the environment
variable `SMTPD_AGENT_SECTION_KEY` (lists comma-separated), and a few standard
names map onto keys (`DATABASE_URL` -> `database.url`, and so on). Flags of
`smtpd-agent serve` override both. Anything invalid stops start-up with a
`ConfigError` naming the key, which the CLI prints as one line.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from .relay_url import RelayUrlError, parse_relay_url

ENV_PREFIX = "SMTPD_AGENT_"
DEFAULT_CONFIG_PATH = Path("config/smtpd-agent.toml")

# Standard variable names that ops already know, mapped onto our keys.
STANDARD_ENV = {
    "DATABASE_URL": "database.url",
    "ANTHROPIC_API_KEY": "agent.api_key",
    "ANTHROPIC_BASE_URL": "agent.base_url",
    # botocore itself only knows AWS_ENDPOINT_URL_SESV2 for the SESv2 API; ops know _SES
    "AWS_ENDPOINT_URL_SES": "outbound.ses_endpoint_url",
}


LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Retention days above this are a mistake (a century), not a policy.
MAX_RETENTION_DAYS = 36_500
HOSTNAME = re.compile(r"^([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class ConfigError(ValueError):
    """A setting is missing, malformed or out of range; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    hostname: str = field(default_factory=socket.getfqdn)
    default_domain: str = "aexy.email"
    state_dir: Path = Path("state")
    # Start on port 25 even when `hostname` is a name like localhost (local_name_problem).
    allow_local_hostname: bool = False


def local_name_problem(name: str) -> str | None:
    """Why `name` cannot be a public MX's greeting name (RFC 5321 4.1.4, 4.1.1.1: a name
    that resolves to us), or None. Receivers score a `localhost` HELO as spam."""
    host = name.strip().lower().rstrip(".")
    if not host:
        return "it is empty"
    if host == "localhost" or host.endswith((".localhost", ".localdomain", ".local")):
        return "it is a local-only name"
    try:
        ipaddress.ip_address(host.strip("[]"))
        return "it is an address, not a name"
    except ValueError:
        pass
    if "." not in host:
        return "it is not fully qualified"
    return None


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = ""
    pool_min: int = 1
    pool_max: int = 10
    connect_timeout: float = 5.0
    command_timeout: float = 30.0


@dataclass(frozen=True)
class SmtpSettings:
    host: str = "127.0.0.1"
    port: int = 2525
    max_message_size: int = 26_214_400
    max_header_size: int = 262_144
    max_recipients: int = 100
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    processes: int = 0  # 0: one per usable CPU, at most MAX_AUTO_PROCESSES
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    max_commands: int = 10_000
    data_memory_budget: int = 268_435_456
    min_data_rate: int = 500
    data_rate_window: float = 30.0
    shutdown_grace: float = 30.0
    bare_lf: Literal["normalize", "reject"] = "normalize"
    tls_cert: str = ""
    tls_key: str = ""
    require_starttls: bool = False
    session: Literal["aiosmtpd", "native"] = "native"


@dataclass(frozen=True)
class RoutingSettings:
    cache_ttl: float = 30.0
    postmaster: str = ""


@dataclass(frozen=True)
class StoreSettings:
    thread_window_days: int = 30
    batch_max: int = 32
    committers: int = 2
    commit_overlap: float = 0.01
    batch_max_bytes: int = 64 * 1024 * 1024
    search_batch: int = 500
    search_poll: float = 5.0
    search_delay: float = 0.2
    search_max_delay: float = 5.0


@dataclass(frozen=True)
class ContentSettings:
    """Bounds of the text an LLM is given (extract/): extracted_text, attachment text."""

    extract_max_input: int = 65_536
    extract_max_lines: int = 500
    extract_max_chars: int = 20_000
    html_max_input: int = 131_072
    extract_timeout: float = 2.0
    attachment_max_bytes: int = 10_485_760
    attachment_max_chars: int = 100_000
    pdf_max_pages: int = 50
    pdf_timeout: float = 10.0
    pdf_memory_mb: int = 512
    pdf_workers: int = 2


@dataclass(frozen=True)
class DnsSettings:
    nameservers: list[str] = field(default_factory=list)
    timeout: float = 5.0
    cache_size: int = 10_000


@dataclass(frozen=True)
class AuthSettings:
    authserv_id: str = ""
    dmarc_reject: bool = True
    spf_fail: Literal["mark", "reject"] = "mark"
    temperror: Literal["accept", "tempfail"] = "accept"
    # Deadline in seconds for each of SPF, DKIM and ARC (run concurrently); a
    # check that misses it counts as temperror.
    timeout: float = 20.0
    # DMARC policy discovery: "psl" = the From domain, else its organizational
    # domain by the Public Suffix List (RFC 7489); "treewalk" = DNS tree walk (RFC 9989).
    dmarc_discovery: Literal["psl", "treewalk"] = "psl"
    # DKIM signatures verified per message (RFC 6376 6.1 allows a limit); those whose
    # d= aligns with the From domain are chosen first, the rest are not verified.
    dkim_max_signatures: int = 5
    # Threads for DKIM and ARC verification (CPU-bound) per process, and for SPF
    # (mostly waiting for DNS): separate pools, so neither can starve the other.
    verify_workers: int = 2
    dns_workers: int = 16


@dataclass(frozen=True)
class ScanSettings:
    clamd: str = ""
    required: bool = True
    scan_all: bool = False
    timeout: float = 30.0
    max_stream_size: int = 26_214_400


@dataclass(frozen=True)
class SpamSettings:
    rspamd: str = ""
    required: bool = False
    timeout: float = 15.0
    greylist: Literal["ignore", "label", "tempfail"] = "ignore"


@dataclass(frozen=True)
class AgentSettings:
    api_key: str = ""
    base_url: str = ""
    # A current Sonnet-class model the installed SDK lists and does not warn about
    # (the newest Sonnet in its ModelParam; DEPRECATED_MODELS lists claude-sonnet-4-5); tests check.
    model: str = "claude-sonnet-5-5"
    max_tokens: int = 1024
    timeout: float = 60.0
    # Concurrent jobs per process (`serve` and `worker`); 0 in `serve`: no in-process workers.
    workers: int = 2
    # Seconds a claimed job stays reserved; must outlast one API call (agent.timeout).
    lease: float = 120.0
    poll_interval: float = 1.0
    max_attempts: int = 5
    backoff_base: float = 10.0
    backoff_max: float = 900.0
    correspondent_replies_per_hour: int = 5
    agent_replies_per_hour: int = 200
    # Caps over all agents of one workspace (any outbound message counts), and on the
    # addresses one agent writes to for the first time in a day.
    workspace_replies_per_hour: int = 500
    workspace_replies_per_day: int = 2000
    new_recipients_per_day: int = 100
    # Characters of one message's body put in the prompt (the rest is cut, and says so).
    max_body_chars: int = 20_000
    # Without an API key: "" records jobs as skipped; any text is sent as a canned reply.
    offline_reply: str = ""


@dataclass(frozen=True)
class DomainSettings:
    """What `dns-records` and `domain add` ask the operator's and customers' DNS to say."""

    # MX hosts every custom domain points at (preference 10 and 20); empty means
    # mx1.<default domain> and mx2.<default domain>.
    mx_primary: str = ""
    mx_backup: str = ""
    # The Mail-From (Return-Path) subdomain: <label>.<custom domain>, and
    # <default label>.<default domain> for the operator's own domain.
    mail_from_label: str = "mail"
    default_mail_from_label: str = "bounce"
    # SPF mechanisms of the operator's sending hosts, published once at
    # _spf.<default domain> and included from every domain; empty: a:<each MX host>.
    spf_mechanisms: list[str] = field(default_factory=list)
    dmarc_policy: Literal["none", "quarantine", "reject"] = "quarantine"
    # Aggregate report address(es) for the DMARC rua tag, e.g. "mailto:dmarc@aexy.email"; empty: none.
    dmarc_rua: str = ""
    # DKIM selectors are <prefix>-<yyyymmdd>-rsa and <prefix>-<yyyymmdd>-ed25519.
    dkim_selector_prefix: str = "sa"
    # Non-empty: the operator hosts the public keys under this zone and customers
    # publish CNAMEs to it; empty: customers publish the key TXT records themselves.
    dkim_hosted_zone: str = ""
    # Seconds between re-checks of verified domains by `serve`; 0 disables them.
    recheck_interval: float = 3600.0
    # The secret that encrypts DKIM private keys in Postgres (mode 0600 or
    # stricter); empty: <server.state_dir>/dkim.secret, created on first use.
    key_file: str = ""
    # DKIM rotation (`domain rotate-dkim`): seconds the old selector stays published
    # after the new one signs (mail in flight, verifiers' caches).
    dkim_rotation_grace: float = 172_800.0
    # Seconds between steps of pending rotations by `serve`; 0 disables them.
    rotation_interval: float = 300.0


@dataclass(frozen=True)
class DnsServerSettings:
    """The authoritative DNS server for delegated zones (`dns-serve`, or inside `serve`)."""

    # "address:port" for UDP and TCP, e.g. "0.0.0.0:53" or "[::]:53"; empty: not run.
    listen: str = ""
    # Our name servers' host names, the NS set of every delegated zone; empty:
    # ns1.<default domain> and ns2.<default domain>.
    nameservers: list[str] = field(default_factory=list)
    # "host=address" for name servers whose names lie inside a delegated zone:
    # printed as glue by `domain add --delegate` and served in that zone.
    glue: list[str] = field(default_factory=list)
    # SOA RNAME (the zone's contact, RFC 1035 3.3.13); empty: hostmaster.<default domain>.
    soa_rname: str = ""
    soa_refresh: int = 3600
    soa_retry: int = 600
    soa_expire: int = 1_209_600
    # Negative-answer TTL (RFC 2308).
    soa_minimum: int = 300
    # TTL of every other record served.
    ttl: int = 300
    # Seconds a loaded zone is served from memory before it is re-read from Postgres.
    cache_ttl: float = 5.0
    # Seconds past cache_ttl the last good copy of a zone is still served while
    # Postgres fails (RFC 8767 serve-stale); 0: SERVFAIL at once.
    max_stale: float = 86_400.0
    # TTL of the records of such a stale answer (RFC 8767 4 recommends 30).
    stale_ttl: int = 30
    # Per source address over UDP: queries per second and burst; beyond, dropped
    # (a spoofed source must not turn us into an amplifier). 0 disables.
    rate_limit: float = 50.0
    rate_burst: int = 100
    # Largest UDP answer with EDNS0 (RFC 6891; 1232 avoids fragmentation).
    udp_payload: int = 1232
    # Seconds an idle TCP connection is kept, and how many may be open at once: in
    # total, and from one source (an IPv4 address or an IPv6 /64; 0: no per-source cap).
    tcp_timeout: float = 10.0
    max_tcp_connections: int = 256
    max_tcp_connections_per_source: int = 8


@dataclass(frozen=True)
class MtaStsSettings:
    """MTA-STS (RFC 8461) and TLS-RPT (RFC 8460) for every domain we receive for."""

    # Policy mode: "testing" (report only), "enforce", or "none".
    mode: Literal["testing", "enforce", "none"] = "testing"
    # Seconds senders cache the policy (RFC 8461 3.2; at most 31557600).
    max_age: int = 604_800
    # The HTTPS host (TLS-terminating proxy in front of our HTTP surface) that
    # mta-sts.<domain> points at with a CNAME; empty: mta-sts.<default domain>.
    proxy_host: str = ""
    # TLS-RPT report destinations (mailto: or https:, comma-separated); empty:
    # mailto:tls-reports@<default domain>.
    tlsrpt_rua: str = ""


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP surface (health, metrics, inbox API, provider webhooks); see smtpd_agent/http."""

    host: str = "127.0.0.1"
    port: int = 8001
    # Seconds a signed webhook timestamp (Mailgun, SendGrid) may be old or ahead.
    webhook_max_age: float = 300.0
    # Largest webhook body taken (bytes, 413 above; SES posts: at most 1 MiB whatever this says).
    webhook_max_body_size: int = 37_748_736
    # Seconds a webhook body may take to arrive (408 after).
    webhook_read_timeout: float = 60.0
    # Webhook posts read or processed at once per process; more get 503 with Retry-After.
    webhook_concurrency: int = 4
    # SES via SNS: topics whose notifications we take; empty refuses every SES post.
    ses_topic_arns: list[str] = field(default_factory=list)
    # SNS SigningCertURL and SubscribeURL must match this (a regular expression); the
    # certificate's path must also be /SimpleNotificationService-<hex>.pem.
    sns_url_pattern: str = r"^https://sns\.[a-z]{2}(-[a-z]+)+-[0-9]+\.amazonaws\.com(\.cn)?/"
    # PEM bundle of the CAs an SNS signing certificate must chain to; empty: the system's.
    sns_ca_file: str = ""
    # The DNS name (subjectAltName) the SNS signing certificate must carry.
    sns_certificate_name: str = "sns.amazonaws.com"
    # Seconds an SNS message's signed Timestamp may differ from our clock; its MessageId
    # is remembered (in Postgres) for twice as long, so a replay within it is ignored.
    sns_max_age: float = 3600.0
    # SendGrid Inbound Parse signature verification key (base64 DER or PEM, ECDSA P-256).
    sendgrid_public_key: str = ""
    # Mailgun HTTP webhook signing key.
    mailgun_signing_key: str = ""
    # Postmark inbound: the basic-auth credentials put in the webhook URL.
    postmark_username: str = ""
    postmark_password: str = ""
    # Attachments one message sent, replied or drafted over the API may carry, and the
    # bytes of each (the whole message stays within smtp.max_message_size).
    api_max_attachments: int = 20
    api_max_attachment_size: int = 10_485_760
    # The event stream (GET /api/v1/workspaces/<slug>/events, events/stream.py): seconds
    # between heartbeat comments; seconds a reader may leave a write unread before it is
    # cut off; streams open at once per API key and per workspace (per process).
    events_heartbeat: float = 15.0
    events_send_timeout: float = 60.0
    events_streams_per_key: int = 4
    events_streams_per_workspace: int = 16


@dataclass(frozen=True)
class OutboundSettings:
    """How agent replies leave: transport, retries, the bounce (Mail-From) address."""

    # "smtp": through outbound.relay; "ses": Amazon SES (SESv2 SendEmail, raw).
    transport: Literal["smtp", "ses"] = "smtp"
    # smtp://[user:password@]host[:port][?tls=starttls|implicit|none]; empty: nothing sends
    # (messages stay queued and the worker logs why).
    relay: str = ""
    # PEM file of the CA(s) to trust for the relay's certificate; empty: the system's.
    relay_ca_file: str = ""
    # Seconds for connecting to, and for each command of, the relay / each SES call.
    timeout: float = 30.0
    # Worker: seconds between polls of the queue, and messages claimed per poll.
    poll_interval: float = 1.0
    batch_size: int = 10
    # Deliveries one worker attempts at once (each with its own relay connection, reused).
    concurrency: int = 4
    # Seconds a claimed message is ours; a worker that dies mid-send frees it after this.
    lease: float = 300.0
    # Retry after a 4xx or a connection error: retry_base * 2^(attempt-1) seconds,
    # at most retry_max; after give_up_after seconds in the queue the message fails.
    retry_base: float = 60.0
    retry_max: float = 3600.0
    give_up_after: float = 432000.0
    # The Mail-From (Return-Path) local-part prefix of VERP addresses: <prefix>-<token>@<bounce domain>.
    verp_prefix: str = "b"
    # Amazon SES: region (empty: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1) and
    # endpoint (empty: AWS's; AWS_ENDPOINT_URL_SES sets it). Credentials: the standard AWS_*.
    ses_region: str = ""
    ses_endpoint_url: str = ""
    # SES configuration set to send with (its event destinations carry bounces and complaints).
    ses_configuration_set: str = ""


@dataclass(frozen=True)
class WebhookSettings:
    """Outgoing webhooks: the workspaces' endpoints that get their events (smtpd_agent/hooks).
    Not the providers' incoming webhooks, which are http.*."""

    # Deliveries one process attempts at once; 0: this process delivers none (another does).
    concurrency: int = 4
    # Seconds between polls of the delivery queue (a new event wakes the worker at once).
    poll_interval: float = 1.0
    # Deliveries claimed per poll.
    batch_size: int = 20
    # Seconds a claimed delivery belongs to its worker; one that dies frees it after this.
    lease: float = 60.0
    # Seconds to connect to an endpoint, and for the whole request (answer included).
    connect_timeout: float = 5.0
    timeout: float = 15.0
    # Bytes of an endpoint's answer read (the rest is dropped with the connection).
    max_response_bytes: int = 4096
    # Retry after a failure: retry_base * 2^(attempt-1) seconds, at most retry_max; a
    # delivery still failing give_up_after seconds after its event fails for good.
    retry_base: float = 30.0
    retry_max: float = 7200.0
    give_up_after: float = 86400.0
    # An endpoint whose deliveries failed disable_after_failures times in a row, over at
    # least disable_after_seconds, is disabled (an event and a log line say so); 0: never.
    disable_after_failures: int = 20
    disable_after_seconds: float = 86400.0
    # Endpoints per workspace.
    max_endpoints: int = 20
    # Seconds a rotated-out secret still signs (beside the new one), so receivers can
    # switch over without dropping a delivery.
    secret_rotation_grace: float = 86400.0
    # Tests and development only: admit http:// URLs to a loopback host and delivery to
    # loopback addresses. Off, a webhook goes to https and to global addresses only.
    allow_loopback: bool = False
    # Networks (CIDR) delivered to although private, e.g. an internal receiver's.
    allowed_networks: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RetentionSettings:
    """How long the event outbox and the webhook delivery log keep rows (events/retention.py)."""

    # Seconds between pruning passes of this process; 0: it never prunes (another does).
    # Any number of processes may prune: one at a time does (an advisory lock).
    interval: float = 3600.0
    # Days an event is kept (from its creation); 0: forever. An event stays while any
    # webhook delivery of it is kept.
    events_days: int = 30
    # Days a finished webhook delivery (and its attempts) is kept, by how it ended; 0: forever.
    webhook_delivered_days: int = 7
    webhook_failed_days: int = 30
    # Rows deleted per statement at most, and seconds of pause between two such batches.
    batch_size: int = 1000
    batch_pause: float = 0.2

    @property
    def keeps_everything(self) -> bool:
        """Every days key is 0: a pass has nothing it may delete."""
        return not (self.events_days or self.webhook_delivered_days
                    or self.webhook_failed_days)


@dataclass(frozen=True)
class EdgeSettings:
    """Reputation at the edge: DNSBLs and iprev at connect, per-client rates and bans."""

    # DNSBL zones (RFC 5782) asked about every connecting client, e.g. "zen.spamhaus.org"
    dnsbl: list[str] = field(default_factory=list)
    dnsbl_action: Literal["reject", "mark"] = "reject"
    dnsbl_timeout: float = 3.0
    iprev: bool = True
    iprev_timeout: float = 5.0
    # Per client (IPv4 address, IPv6 /64), per fixed window of rate_window seconds; 0: no limit
    rate_window: float = 60.0
    connection_rate: int = 60
    message_rate: int = 120
    failed_rcpt_rate: int = 30
    ban_seconds: float = 600.0
    # Client networks no rate counts or bans (as Postfix's smtpd_client_event_limit_exceptions)
    rate_exempt: list[str] = field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])


@dataclass(frozen=True)
class McpSettings:
    """The MCP server: `smtpd-agent mcp` (stdio) and /mcp on the HTTP surface; see
    smtpd_agent/mcpserver."""

    # Serve streamable HTTP at /mcp on http.host:http.port.
    http: bool = True
    # Largest /mcp request body in bytes (413 above, before any tool runs).
    max_request_size: int = 1_048_576
    # /mcp requests served at once per process; more get 503 with Retry-After.
    concurrency: int = 16
    # Seconds one tool call may take (then a tool error saying so).
    tool_timeout: float = 30.0
    # Characters of text a tool returns at most per message body or attachment.
    max_text_chars: int = 20_000


@dataclass(frozen=True)
class LogSettings:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    smtp: SmtpSettings = field(default_factory=SmtpSettings)
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    content: ContentSettings = field(default_factory=ContentSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    scan: ScanSettings = field(default_factory=ScanSettings)
    spam: SpamSettings = field(default_factory=SpamSettings)
    agent: AgentSettings = field(default_factory=AgentSettings)
    domains: DomainSettings = field(default_factory=DomainSettings)
    dns_server: DnsServerSettings = field(default_factory=DnsServerSettings)
    mta_sts: MtaStsSettings = field(default_factory=MtaStsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    outbound: OutboundSettings = field(default_factory=OutboundSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    edge: EdgeSettings = field(default_factory=EdgeSettings)
    mcp: McpSettings = field(default_factory=McpSettings)
    log: LogSettings = field(default_factory=LogSettings)

    def replace(self, overrides: Mapping[str, Any]) -> Settings:
        """A copy with `section.key` overrides applied (CLI flags), validated like the file."""
        return _build({**_flatten(self), **overrides}, source="flag")


# What a SIGHUP applies to the running server (sessions opened after it); every other key
# (bind address, database, DNS, routing, agent, logging, anything a later section adds)
# needs a restart. Logging is not live: loggers cache their level on first use (logs.py).
# Prefixes end with ".", other entries are exact keys.
LIVE_KEYS = ("smtp.", "auth.", "scan.", "spam.", "store.", "edge.")
RESTART_ONLY_KEYS = ("smtp.host", "smtp.port", "auth.verify_workers", "auth.dns_workers")


def is_live(key: str) -> bool:
    """Whether a SIGHUP reload applies `key` (see LIVE_KEYS)."""
    if key in RESTART_ONLY_KEYS:
        return False
    return any(key.startswith(p) if p.endswith(".") else key == p for p in LIVE_KEYS)


def apply_live(current: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """`current` with the live keys of `new`; and the changed keys that wait for a restart."""
    old_values, new_values = _flatten(current), _flatten(new)
    changed = [key for key in new_values if new_values[key] != old_values.get(key)]
    live = {key: new_values[key] for key in changed if is_live(key)}
    return current.replace(live), [key for key in changed if not is_live(key)]


def load_settings(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """File (if any), then environment, then `overrides` (CLI flags)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    explicit = path is not None or "SMTPD_AGENT_CONFIG" in env
    config_path = Path(path or env.get("SMTPD_AGENT_CONFIG") or DEFAULT_CONFIG_PATH)
    if config_path.exists():
        try:
            document = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"{config_path}: {error}") from error
        for section, table in document.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a [{section}] table")
            for key, value in table.items():
                values[f"{section}.{key}"] = value
    elif explicit:
        raise ConfigError(f"config file {config_path} does not exist")
    values.update(_from_environment(env))
    values.update(overrides or {})
    return _build(values, source="config")


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Settings)
    return {f.name: hints[f.name] for f in dataclasses.fields(Settings)}


def known_keys() -> dict[str, Any]:
    """Every `section.key` with its type hint."""
    keys = {}
    for section, cls in _sections().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys[f"{section}.{f.name}"] = hints[f.name]
    return keys


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _from_environment(env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, key in STANDARD_ENV.items():
        if env.get(name):
            values[key] = env[name]
    for key in known_keys():
        name = env_name(key)
        if name in env:
            values[key] = env[name]
    return values


def _flatten(settings: Settings) -> dict[str, Any]:
    flat = {}
    for section in _sections():
        for f in dataclasses.fields(getattr(settings, section)):
            flat[f"{section}.{f.name}"] = getattr(getattr(settings, section), f.name)
    return flat


def _build(values: Mapping[str, Any], source: str) -> Settings:
    keys = known_keys()
    unknown = sorted(set(values) - set(keys))
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown setting")
    sections = {}
    for section, cls in _sections().items():
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            if key in values:
                kwargs[f.name] = _coerce(key, values[key], keys[key])
        sections[section] = cls(**kwargs)
    if sections["smtp"].processes == 0:
        sections["smtp"] = dataclasses.replace(sections["smtp"], processes=auto_processes())
    settings = Settings(**sections)
    _validate(settings)
    return settings


# Each accepting process holds its own database pool (database.pool_max connections):
# many cores must not exhaust Postgres's connections (100 by default).
MAX_AUTO_PROCESSES = 4


def auto_processes() -> int:
    """smtp.processes = 0: one accepting process per CPU this process may run on (its
    affinity, as a container's cpuset limits it), at most MAX_AUTO_PROCESSES."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_AUTO_PROCESSES))


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
            return True
        if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
            return False
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            number = hint(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {'an integer' if hint is int else 'a number'}, "
                              f"got {value!r}") from None
        if number < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{key}: expected a path, got {value!r}")
        return Path(value)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
        return list(value)
    if isinstance(hint, types.UnionType):  # pragma: no cover - no such keys yet
        raise ConfigError(f"{key}: unsupported type {hint}")
    raise ConfigError(f"{key}: unsupported type {hint}")  # pragma: no cover


def _validate_webhooks(hooks: WebhookSettings) -> None:
    for key in ("batch_size", "max_response_bytes", "max_endpoints"):
        if getattr(hooks, key) < 1:
            raise ConfigError(f"webhooks.{key}: must be at least 1")
    for key in ("timeout", "connect_timeout", "retry_base", "poll_interval"):
        if getattr(hooks, key) <= 0:
            raise ConfigError(f"webhooks.{key}: must be above 0")
    if hooks.lease <= hooks.timeout:
        raise ConfigError("webhooks.lease: must exceed webhooks.timeout, or a slow endpoint "
                          "gets the same delivery twice")
    for network in hooks.allowed_networks:
        try:
            ipaddress.ip_network(network.strip(), strict=False)
        except ValueError:
            raise ConfigError(f"webhooks.allowed_networks: not a network {network!r}") from None


def _validate_retention(retention: RetentionSettings) -> None:
    if retention.batch_size < 1:
        raise ConfigError("retention.batch_size: must be at least 1")
    for key in ("events_days", "webhook_delivered_days", "webhook_failed_days"):
        if not 0 <= getattr(retention, key) <= MAX_RETENTION_DAYS:
            raise ConfigError(f"retention.{key}: must be 0-{MAX_RETENTION_DAYS} (0: keep "
                              f"forever), got {getattr(retention, key)}")


def _validate(settings: Settings) -> None:
    """Cross-field checks that a type alone cannot express."""
    smtp = settings.smtp
    if not 0 <= smtp.port < 65536:
        raise ConfigError(f"smtp.port: must be 0-65535 (0 picks a free port), got {smtp.port}")
    for key in ("max_message_size", "max_recipients", "max_connections",
                "max_connections_per_ip", "max_header_size", "max_commands"):
        if getattr(smtp, key) < 1:
            raise ConfigError(f"smtp.{key}: must be at least 1")
    if not 1 <= smtp.processes <= 64:
        raise ConfigError(f"smtp.processes: must be 0 (one per CPU) or 1-64, got {smtp.processes}")
    for key in ("data_memory_budget", "min_data_rate"):
        if getattr(smtp, key) < 0:
            raise ConfigError(f"smtp.{key}: must not be negative (0 turns it off)")
    if smtp.data_rate_window <= 0:
        raise ConfigError("smtp.data_rate_window: must be above 0")
    if bool(smtp.tls_cert) != bool(smtp.tls_key):
        raise ConfigError("smtp.tls_cert: tls_cert and tls_key must be set together")
    if smtp.require_starttls and not smtp.tls_cert:
        raise ConfigError("smtp.require_starttls: needs smtp.tls_cert and smtp.tls_key")
    for key in ("tls_cert", "tls_key"):
        value = getattr(smtp, key)
        if value and not Path(value).is_file():
            raise ConfigError(f"smtp.{key}: no such file {value}")
    domain = settings.server.default_domain
    if not domain or "." not in domain.strip(".") or domain != domain.lower().strip("."):
        raise ConfigError(f"server.default_domain: expected a lower-case domain name, got {domain!r}")
    url = settings.database.url
    if url and not url.startswith(("postgres://", "postgresql://")):
        raise ConfigError("database.url: expected a postgresql:// URL")
    if settings.database.pool_min > settings.database.pool_max:
        raise ConfigError("database.pool_min: must not exceed database.pool_max")
    postmaster = settings.routing.postmaster
    if postmaster and (postmaster.count("@") != 1 or not all(postmaster.split("@"))
                       or "+" in postmaster):
        raise ConfigError(f"routing.postmaster: expected an agent address like "
                          f"ops@operator.{settings.server.default_domain}, got {postmaster!r}")
    for key in ("dkim_max_signatures", "verify_workers", "dns_workers"):
        if getattr(settings.auth, key) < 1:
            raise ConfigError(f"auth.{key}: must be at least 1")
    for key in ("batch_max", "committers", "batch_max_bytes"):
        if getattr(settings.store, key) < 1:
            raise ConfigError(f"store.{key}: must be at least 1")
    _validate_edge(settings)
    _validate_webhooks(settings.webhooks)
    _validate_retention(settings.retention)
    content = settings.content
    for key in ("extract_max_input", "extract_max_lines", "extract_max_chars", "html_max_input",
                "attachment_max_bytes", "attachment_max_chars", "pdf_max_pages", "pdf_workers"):
        if getattr(content, key) < 1:
            raise ConfigError(f"content.{key}: must be at least 1")
    for key in ("extract_timeout", "pdf_timeout"):
        if getattr(content, key) <= 0:
            raise ConfigError(f"content.{key}: must be above 0")
    if content.pdf_memory_mb < 64:
        raise ConfigError("content.pdf_memory_mb: must be at least 64 (the interpreter needs it)")
    if settings.store.search_batch < 0:
        raise ConfigError("store.search_batch: must not be negative (0 turns the indexer off)")
    if settings.store.search_poll <= 0:
        raise ConfigError("store.search_poll: must be above 0")
    if not 0 <= settings.store.commit_overlap <= 10:
        raise ConfigError("store.commit_overlap: must be between 0 and 10 seconds")
    if not 0 <= settings.store.search_delay <= 60:
        raise ConfigError("store.search_delay: must be between 0 and 60 seconds")
    if not settings.store.search_delay <= settings.store.search_max_delay <= 3600:
        raise ConfigError("store.search_max_delay: must be between store.search_delay and "
                          "3600 seconds")
    if settings.store.committers >= settings.database.pool_max:
        raise ConfigError("store.committers: must be less than database.pool_max "
                          "(routing, agents and the API need connections too)")
    for server in settings.dns.nameservers:
        host, _, port = server.rpartition(":") if server.count(":") == 1 else (server, "", "")
        if port and not port.isdigit():
            raise ConfigError(f"dns.nameservers: bad port in {server!r}")
    agent = settings.agent
    if agent.lease <= agent.timeout:
        raise ConfigError("agent.lease: must exceed agent.timeout, or a slow call loses its job")
    for key in ("max_attempts", "max_tokens"):
        if getattr(agent, key) < 1:
            raise ConfigError(f"agent.{key}: must be at least 1")
    if agent.base_url and not agent.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"agent.base_url: expected an http(s) URL, got {agent.base_url!r}")
    domains = settings.domains
    for key in ("mail_from_label", "default_mail_from_label", "dkim_selector_prefix"):
        if not LABEL.match(getattr(domains, key)):
            raise ConfigError(f"domains.{key}: expected one lower-case DNS label, "
                              f"got {getattr(domains, key)!r}")
    for key in ("mx_primary", "mx_backup", "dkim_hosted_zone"):
        value = getattr(domains, key)
        if value and not HOSTNAME.match(value):
            raise ConfigError(f"domains.{key}: expected a lower-case host name, got {value!r}")
    if domains.dmarc_rua and not all(uri.strip().startswith("mailto:")
                                     for uri in domains.dmarc_rua.split(",")):
        raise ConfigError(f"domains.dmarc_rua: expected mailto: URIs, got {domains.dmarc_rua!r}")
    _validate_dns_server(settings)
    if not 0 <= settings.http.port < 65536:
        raise ConfigError(f"http.port: must be 0-65535 (0 picks a free port), got "
                          f"{settings.http.port}")
    try:
        re.compile(settings.http.sns_url_pattern)
    except re.error as error:
        raise ConfigError(f"http.sns_url_pattern: not a regular expression: {error}") from None
    http = settings.http
    for key in ("webhook_max_body_size", "webhook_read_timeout", "webhook_concurrency",
                "sns_max_age", "webhook_max_age", "api_max_attachment_size",
                "events_heartbeat", "events_send_timeout", "events_streams_per_key",
                "events_streams_per_workspace"):
        if not getattr(http, key) > 0:
            raise ConfigError(f"http.{key}: must be positive, got {getattr(http, key)}")
    if http.api_max_attachments < 0:
        raise ConfigError("http.api_max_attachments: must not be negative (0: none)")
    for key in ("max_request_size", "concurrency", "tool_timeout", "max_text_chars"):
        if not getattr(settings.mcp, key) > 0:
            raise ConfigError(f"mcp.{key}: must be positive, got {getattr(settings.mcp, key)}")
    if http.sns_ca_file and not Path(http.sns_ca_file).is_file():
        raise ConfigError(f"http.sns_ca_file: no such file {http.sns_ca_file}")
    outbound = settings.outbound
    if outbound.relay:
        try:
            parse_relay_url(outbound.relay)
        except RelayUrlError as error:
            raise ConfigError(f"outbound.relay: {error}") from None
    if outbound.relay_ca_file and not Path(outbound.relay_ca_file).is_file():
        raise ConfigError(f"outbound.relay_ca_file: no such file {outbound.relay_ca_file}")
    if not LABEL.match(outbound.verp_prefix):
        raise ConfigError(f"outbound.verp_prefix: expected one lower-case DNS label, "
                          f"got {outbound.verp_prefix!r}")
    for key in ("batch_size", "concurrency"):
        if getattr(outbound, key) < 1:
            raise ConfigError(f"outbound.{key}: must be at least 1")
    clamd = settings.scan.clamd
    if clamd and not clamd.startswith(("unix:", "tcp:")):
        raise ConfigError(f"scan.clamd: expected unix:/path or tcp:host:port, got {clamd!r}")
    rspamd = settings.spam.rspamd
    if rspamd and not rspamd.startswith(("http://", "https://")):
        raise ConfigError(f"spam.rspamd: expected an http:// URL, got {rspamd!r}")
    if settings.spam.timeout <= 0:
        raise ConfigError("spam.timeout: must be above 0")


def parse_listen(value: str) -> tuple[str, int]:
    """"0.0.0.0:53", "[::]:53" -> (host, port)."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(value)
    return host, int(port)


def _validate_edge(settings: Settings) -> None:
    edge = settings.edge
    for key in ("connection_rate", "message_rate", "failed_rcpt_rate"):
        if not 0 <= getattr(edge, key) <= 0xFFFF:
            raise ConfigError(f"edge.{key}: must be 0 (no limit) to 65535")
    for key in ("dnsbl_timeout", "iprev_timeout", "rate_window", "ban_seconds"):
        if getattr(edge, key) <= 0:
            raise ConfigError(f"edge.{key}: must be above 0")
    for network in edge.rate_exempt:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ConfigError(f"edge.rate_exempt: expected networks like 192.0.2.0/24, "
                              f"got {network!r}") from None
    for zone in edge.dnsbl:
        if not zone or "." not in zone.strip(".") or any(c in zone for c in " /@"):
            raise ConfigError(f"edge.dnsbl: expected DNS zone names, got {zone!r}")


def _validate_dns_server(settings: Settings) -> None:
    server = settings.dns_server
    if server.listen:
        try:
            parse_listen(server.listen)
        except ValueError:
            raise ConfigError(f"dns_server.listen: expected address:port, got {server.listen!r}")
    for host in server.nameservers:
        if not HOSTNAME.match(host):
            raise ConfigError(f"dns_server.nameservers: expected lower-case host names, got {host!r}")
    for entry in server.glue:
        host, eq, address = entry.partition("=")
        if not eq or not HOSTNAME.match(host):
            raise ConfigError(f"dns_server.glue: expected host=address, got {entry!r}")
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise ConfigError(f"dns_server.glue: bad address in {entry!r}") from None
    if server.soa_rname and not HOSTNAME.match(server.soa_rname):
        raise ConfigError(f"dns_server.soa_rname: expected a host name, got {server.soa_rname!r}")
    if not 512 <= server.udp_payload <= 4096:
        raise ConfigError("dns_server.udp_payload: must be 512-4096")
    mta_sts = settings.mta_sts
    if not 0 < mta_sts.max_age <= 31_557_600:
        raise ConfigError("mta_sts.max_age: must be 1-31557600 (RFC 8461 3.2)")
    if mta_sts.proxy_host and not HOSTNAME.match(mta_sts.proxy_host):
        raise ConfigError(f"mta_sts.proxy_host: expected a host name, got {mta_sts.proxy_host!r}")
    if mta_sts.tlsrpt_rua and not all(u.strip().startswith(("mailto:", "https:"))
                                      for u in mta_sts.tlsrpt_rua.split(",")):
        raise ConfigError("mta_sts.tlsrpt_rua: expected mailto: or https: URIs (RFC 8460 3)")
