"""Counters of several processes (smtp.processes) rendered as one exposition."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from smtpd_agent.metrics import Metrics, MetricsSpooler


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text.decode())
            for s in family.samples}


async def test_render_adds_the_spooled_processes(tmp_path):
    main, other = Metrics(), Metrics()
    main.accepted.labels("smtp").inc(3)
    other.accepted.labels("smtp").inc(4)
    other.accepted.labels("webhook").inc(1)
    for metrics, seconds in ((main, 0.004), (other, 0.2), (other, 0.003)):
        metrics.store_latency.observe(seconds)
    spooler = MetricsSpooler(other, tmp_path)
    await spooler.start()
    await spooler.stop()  # removes its file: write one as a running process would
    spooler.write()
    main.spool = spooler.path.parent

    merged = samples(main.render())
    assert merged[("smtpd_agent_messages_accepted_total", (("transport", "smtp"),))] == 7
    assert merged[("smtpd_agent_messages_accepted_total", (("transport", "webhook"),))] == 1
    assert merged[("smtpd_agent_store_seconds_count", ())] == 3
    assert merged[("smtpd_agent_store_seconds_bucket", (("le", "0.005"),))] == 2
    created = ("smtpd_agent_messages_accepted_created", (("transport", "smtp"),))
    assert merged[created] == min(samples(generate_latest(main.registry))[created],
                                  samples(generate_latest(other.registry))[created])


def test_without_a_spool_render_is_the_own_registry():
    metrics = Metrics()
    metrics.accepted.labels("smtp").inc()
    assert samples(metrics.render())[
        ("smtpd_agent_messages_accepted_total", (("transport", "smtp"),))] == 1
