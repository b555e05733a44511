"""Events for agents that live elsewhere: the outbox (store/events.py) read live.

stream.py serves it as Server-Sent Events; the webhook worker delivers the same rows.
"""
