"""Standard Webhooks (https://www.standardwebhooks.com/, spec v1): secrets and signatures.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`, HMAC-SHA256 under the
secret's bytes, sent as `webhook-signature: v1,<base64>`; several space-separated
signatures while a rotated-out secret is still honoured. The secret is shown to the
workspace once as `whsec_<base64>` of 32 random bytes (the spec asks for 24 to 64).
The HMAC itself is the maintained `standardwebhooks` package's, so a receiver using any
of the specification's libraries computes the same thing.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook

PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    """A fresh `whsec_` secret."""
    return PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def is_secret(value: str) -> bool:
    if not value.startswith(PREFIX):
        return False
    try:
        raw = base64.b64decode(value[len(PREFIX):], validate=True)
    except ValueError:
        return False
    return 24 <= len(raw) <= 64


def headers(message_id: str, when: datetime, body: bytes,
            secrets_: Sequence[str]) -> dict[str, str]:
    """The three headers of one attempt, signed with each of `secrets_` (newest first)."""
    moment = when.astimezone(UTC)
    text = body.decode("utf-8")
    signatures = " ".join(Webhook(secret).sign(message_id, moment, text) for secret in secrets_)
    return {"webhook-id": message_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": signatures}
