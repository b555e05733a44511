"""The SMTP listener: a thin adapter from aiosmtpd sessions to the pipeline."""
