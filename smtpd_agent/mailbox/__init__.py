"""Programmable mailboxes (issue 18): agents that live elsewhere send, reply and approve
drafts through the HTTP API, on the same composition, store, queue and limits as the
built-in agent."""
