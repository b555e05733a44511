"""Outbound delivery (DESIGN.md step 7): agent replies leave signed, retried until delivered.

Place in the pipeline: after the agent worker stores a reply (`messages` row,
direction 'outbound', status 'queued') and calls `queue.enqueue()` in its
transaction. The `OutboundWorker` (worker.py) claims due deliveries, signs
each message once with the From domain's DKIM keys (signing.py), sends it
through the configured transport (transports.py: SMTP relay or Amazon SES)
with a VERP Return-Path (verp.py), and applies the pure decisions of
decisions.py to the replies. Bounces come back as DSNs over SMTP to the VERP
address (routing -> pipeline -> bounces.py) or as SES notifications, and put
hard-bounced and complaining addresses on the workspace's suppression list
(`queue.is_suppressed`).
"""
