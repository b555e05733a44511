"""Signed outgoing webhooks: each workspace's endpoints get the events of its outbox.

Place: a feature (docs/architecture.md). The outbox (store/events.py) writes an event in
the transaction that caused it; a trigger (store/functions/fan_out_webhooks.sql) turns it,
in that same transaction, into one delivery per enabled endpoint of the workspace that
wants its type; the DeliveryWorker (worker.py) leases deliveries (store/lease.py) and
POSTs them signed per the Standard Webhooks specification (signing.py) to addresses the
policy in targets.py admits.
"""
