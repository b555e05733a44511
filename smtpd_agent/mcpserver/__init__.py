"""The MCP server (issue 19): the mailbox API's reading, sending, drafts and labels as
tools any model can call, over stdio (`smtpd-agent mcp`) and streamable HTTP (/mcp),
authenticated by a workspace API key whose scopes apply."""
