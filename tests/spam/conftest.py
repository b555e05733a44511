"""The spam tests answer through the agent's local Messages API (tests/agent/conftest.py)."""

from tests.agent.conftest import agent_server, messages_api

__all__ = ["agent_server", "messages_api"]
