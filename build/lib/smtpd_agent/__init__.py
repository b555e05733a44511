"""smtpd-agent: an MX-facing SMTP server that gives AI agents their own email addresses."""

__version__ = "0.1.0"
