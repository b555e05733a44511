"""The spam tests answer through the agent's local Messages API (tests/agent/conftest.py),
with example.org authenticated by SPF as the agent requires of a correspondent."""

from tests.agent.conftest import agent_server, authenticated_senders, messages_api

__all__ = ["agent_server", "authenticated_senders", "messages_api"]
