"""Prometheus metrics: what each pipeline stage counts, read by GET /metrics.

One `Metrics` per App, each with its own CollectorRegistry (never the
process-global one), so two servers in one test process count apart. The
listener counts sessions; smtp/replies.answer() counts every refusal (of a
recipient or a message, SMTP or webhook) and every accepted message, in one
place; the pipeline counts authentication verdicts, scan results and store
latency; gauges of rows in Postgres (agent jobs, outbound queue) are read at scrape
time, because they are state that lives in the database, not in a process.

With smtp.processes above 1, each extra accepting process writes its counters
to a spool file every SPOOL_SECONDS (MetricsSpooler); the main process's
/metrics adds them to its own, so the counters cover every process.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

log = structlog.get_logger(__name__)

# Tables whose rows by state are queue depths, if a later stage has created them. Read at
# scrape time so the numbers are the cluster's, not this process's.
QUEUE_TABLES = ("agent_jobs", "deliveries", "outbound", "outbound_queue", "outbound_messages",
                "webhook_deliveries")
STATE_COLUMNS = ("state", "status")


@dataclass
class Metrics:
    """The counters of one process; cheap to call from the hot path."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    queue_tables: tuple[str, ...] = QUEUE_TABLES
    # The extra accepting processes' spool files, added in by render() (smtp.processes > 1).
    spool: Path | None = None

    def __post_init__(self) -> None:
        r = self.registry
        self.sessions = Counter("smtpd_agent_smtp_sessions", "SMTP sessions opened",
                                registry=r)
        self.sessions_active = Gauge("smtpd_agent_smtp_sessions_active",
                                     "SMTP sessions open now", registry=r)
        self.accepted = Counter("smtpd_agent_messages_accepted",
                                "Messages stored (250 or webhook 200)", ["transport"], registry=r)
        self.rejected = Counter("smtpd_agent_messages_rejected",
                                "Messages or recipients refused, by reason and reply code",
                                ["transport", "stage", "reason", "code"], registry=r)
        self.auth = Counter("smtpd_agent_auth_verdicts", "Authentication verdicts",
                            ["check", "result"], registry=r)
        self.scans = Counter("smtpd_agent_scan_results", "clamd scan results", ["status"],
                             registry=r)
        self.spam_checks = Counter("smtpd_agent_spam_results",
                                   "rspamd results: its action, or 'unscored'", ["result"],
                                   registry=r)
        self.store_latency = Histogram(
            "smtpd_agent_store_seconds", "Seconds to store one accepted message (to COMMIT)",
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1,
                                 2.5, 5, 10))
        self.webhooks = Counter("smtpd_agent_webhook_requests", "Provider webhook posts",
                                ["provider", "outcome"], registry=r)
        self.edge_rate_exceeded = Counter(
            "smtpd_agent_edge_rate_exceeded",
            "Clients banned for going over a per-client rate, by the rate", ["kind"],
            registry=r)
        self.edge_refused = Counter(
            "smtpd_agent_edge_refused",
            "Connections or commands refused at the edge (ban, rate, dnsbl)", ["reason"],
            registry=r)
        self.dnsbl = Counter("smtpd_agent_dnsbl_results", "DNSBL answers by zone and result",
                             ["zone", "result"], registry=r)
        self.iprev = Counter("smtpd_agent_iprev_results", "iprev verdicts of connections",
                             ["result"], registry=r)
        # Outgoing webhooks (smtpd_agent/hooks): attempts by outcome (delivered, failed,
        # refused by the address policy), deliveries given up, endpoints disabled; the
        # delivery queue's depth is queue_depth{queue="webhook_deliveries"}.
        self.webhook_deliveries = Counter(
            "smtpd_agent_webhook_attempts", "Webhook delivery attempts by outcome", ["outcome"],
            registry=r)
        self.webhook_gave_up = Counter(
            "smtpd_agent_webhook_deliveries_failed",
            "Webhook deliveries that failed for good (retries exhausted, endpoint gone)",
            registry=r)
        self.webhook_endpoints_disabled = Counter(
            "smtpd_agent_webhook_endpoints_disabled",
            "Webhook endpoints disabled after repeated failure", registry=r)
        self.webhook_seconds = Histogram(
            "smtpd_agent_webhook_attempt_seconds", "Seconds one webhook attempt took",
            registry=r, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.event_streams = Gauge("smtpd_agent_event_streams",
                                   "Event streams (SSE) open now", registry=r)
        self.events_streamed = Counter("smtpd_agent_events_streamed",
                                       "Events sent on event streams", registry=r)
        self.event_streams_refused = Counter(
            "smtpd_agent_event_streams_refused",
            "Event streams refused (over a cap), by cap", ["reason"], registry=r)
        self.event_streams_ended = Counter(
            "smtpd_agent_event_streams_ended",
            "Event streams ended: reader gone, reader stalled (cut off), server closing, "
            "database unavailable", ["reason"], registry=r)
        self.events_last_id = Gauge(
            "smtpd_agent_events_last_id",
            "Newest id in the event outbox, read at scrape time (its rate: events per second)",
            registry=r)
        self.event_stream_gaps = Counter(
            "smtpd_agent_event_stream_gaps",
            "Event streams resumed after an id older than retention kept (told with a gap "
            "event)", registry=r)
        # Retention (events/retention.py): passes by outcome (done, skipped: another
        # process held the lock, failed) and rows deleted by kind.
        self.retention_passes = Counter(
            "smtpd_agent_retention_passes", "Pruning passes of the event outbox and the "
            "webhook delivery log, by outcome", ["outcome"], registry=r)
        self.retention_deleted = Counter(
            "smtpd_agent_retention_deleted", "Rows deleted by retention, by kind (events, "
            "webhook_deliveries_delivered, webhook_deliveries_failed)", ["kind"], registry=r)
        # The MCP server (mcpserver/): tool calls by tool and outcome (ok, error: a tool
        # error, refused: the key lacks the tool's scope, unauthorized: the key went
        # invalid), and /mcp requests turned away before any tool ran, by reason.
        self.mcp_tool_calls = Counter(
            "smtpd_agent_mcp_tool_calls", "MCP tool calls by tool and outcome",
            ["tool", "outcome"], registry=r)
        self.mcp_rejected = Counter(
            "smtpd_agent_mcp_requests_rejected",
            "/mcp requests refused before the MCP server saw them (unauthorized, busy, "
            "too_large, too_slow, incomplete)", ["reason"], registry=r)
        self.search_indexed = Counter("smtpd_agent_search_indexed",
                                      "Messages made searchable by the search indexer",
                                      registry=r)
        self.search_pending = Gauge(
            "smtpd_agent_search_pending",
            "Messages stored and not yet searchable, read at scrape time", registry=r)
        self.queue_depth = Gauge("smtpd_agent_queue_depth",
                                 "Rows of a queue table by state, read at scrape time",
                                 ["queue", "state"], registry=r)

    def rejected_reply(self, transport: str, stage: str, reason: str, code: int) -> None:
        self.rejected.labels(transport, stage, reason, str(code)).inc()

    def auth_result(self, spf: str, dkim: str, dmarc: str, arc: str) -> None:
        for check, result in (("spf", spf), ("dkim", dkim), ("dmarc", dmarc), ("arc", arc)):
            self.auth.labels(check, result or "none").inc()

    async def refresh_queues(self, db: asyncpg.Pool | asyncpg.Connection) -> None:
        """Set the queue gauges from Postgres; tables that do not exist yet are skipped."""
        rows = await db.fetch(
            """SELECT table_name, min(column_name) AS state_column
               FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = ANY($1::text[])
                 AND column_name = ANY($2::text[])
               GROUP BY table_name""", list(self.queue_tables), list(STATE_COLUMNS))
        self.queue_depth.clear()
        for row in rows:
            # Names come from the allow-list (queue_tables), never from a request.
            table, column = row["table_name"], row["state_column"]
            counts = await db.fetch(
                f'SELECT "{column}"::text AS state, count(*) AS n FROM "{table}" GROUP BY 1')
            for count in counts:
                self.queue_depth.labels(table, count["state"] or "").set(count["n"])
        if await db.fetchval("SELECT to_regclass('events') IS NOT NULL"):
            self.events_last_id.set(await db.fetchval("SELECT coalesce(max(id), 0) FROM events"))
        if await db.fetchval("SELECT to_regclass('search_queue') IS NOT NULL"):
            self.search_pending.set(await db.fetchval("SELECT count(*) FROM search_queue"))

    def render(self) -> bytes:
        own = generate_latest(self.registry)
        if self.spool is None:
            return own
        texts = [own.decode()]
        for path in sorted(self.spool.glob("*.prom")):
            try:
                texts.append(path.read_text())
            except OSError:  # the process is going away; its last counts go with it
                continue
        merged = CollectorRegistry(auto_describe=False)
        merged.register(_Sum(texts))
        return generate_latest(merged)


class _Sum:
    """Expositions of several processes as one: each sample summed across them, except
    creation times, which keep the earliest."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def collect(self) -> Iterator[Metric]:
        families: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.texts:
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, Metric(family.name, family.documentation,
                                                        family.type))
                sums = values.setdefault(family.name, {})
                for sample in family.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    if sample.name.endswith("_created"):
                        sums[key] = min(sums.get(key, sample.value), sample.value)
                    else:
                        sums[key] = sums.get(key, 0.0) + sample.value
        for name, metric in families.items():
            for (sample_name, labels), value in values[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            yield metric


SPOOL_SECONDS = 1.0


def spool_directory(state_dir: Path) -> Path:
    return state_dir / "metrics"


class MetricsSpooler:
    """In an extra accepting process: this process's counters, written for the main one."""

    def __init__(self, metrics: Metrics, state_dir: Path) -> None:
        self.metrics = metrics
        self.path = spool_directory(state_dir) / f"{os.getpid()}.prom"
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.write()
            await asyncio.sleep(SPOOL_SECONDS)

    def write(self) -> None:
        staging = self.path.with_suffix(".tmp")
        staging.write_bytes(generate_latest(self.metrics.registry))
        os.replace(staging, self.path)  # the reader never sees half a file

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.path.unlink(missing_ok=True)
