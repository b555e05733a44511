"""ARC (RFC 8617) for the authenticate stage: verify the chain a forwarder (a list) added.

We only validate and record the chain (pass / fail / none, or temperror when a
key could not be fetched); it does not change the DMARC verdict by itself, but
an operator or a later policy can trust `arc=pass` from known forwarders.
dkimpy does the work (where, auth/runner.py decides, as for DKIM), with keys
fetched through our resolver and each body variant hashed once; a DNS
temporary error escapes dkimpy (it is not a DKIMException) and becomes
temperror rather than a broken chain.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal

import dkim
import structlog

from ..dns import DnsTempError, SyncResolver
from .adapters import ArcVerifier, DkimMessage, make_dnsfunc
from .dkim import MIN_RSA_BITS, header_section, shared_message
from .runner import INLINE_MAX, SyncCheck

log = structlog.get_logger(__name__)

ArcStatus = Literal["pass", "fail", "none", "temperror"]


@dataclass(frozen=True)
class ArcResult:
    result: ArcStatus
    reason: str = ""
    instances: int = 0
    # Per ARC set, newest first: instance, seal domain/selector, cv, ams/as verdicts.
    chain: tuple[dict[str, Any], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["chain"] = list(self.chain)
        return data


def _text(value: object) -> object:
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def verify_chain(message: DkimMessage, dnsfunc: Any,
                 checkpoint: Callable[[], None] = lambda: None) -> ArcResult:
    """Blocking ARC validation (RFC 8617 section 5.2)."""
    try:
        arc = ArcVerifier(message, minkey=MIN_RSA_BITS, checkpoint=checkpoint)
        cv, sets, reason = arc.verify(dnsfunc=dnsfunc)
    except DnsTempError as error:
        return ArcResult("temperror", reason=f"key lookup: {error}")
    except dkim.DKIMException as error:
        return ArcResult("fail", reason=str(error))
    # dkimpy's crashes on hostile sets: an ARC-Message-Signature whose " i=N;" it cannot
    # find again in the raw field (written "i=1" right after the colon); a t= of more
    # digits than Python converts (4300)
    except (IndexError, ValueError):
        return ArcResult("fail", reason="malformed ARC set")
    chain = tuple({key: _text(value) for key, value in s.items()} for s in sets)
    if cv == dkim.CV_Pass:
        status: ArcStatus = "pass"
    elif cv == dkim.CV_None and not sets:
        status = "none"
    else:  # CV_Fail, or None: an earlier hop already recorded cv=fail (chain terminated)
        status = "fail"
    return ArcResult(status, reason="" if status in ("pass", "none") else str(reason),
                     instances=len(sets), chain=chain)


HAS_ARC = re.compile(rb"(?im)^arc-(seal|message-signature|authentication-results)\s*:")


ARC_SEAL = re.compile(rb"(?im)^arc-seal\s*:")
# RFC 8617 4.2.1: i= runs from 1 to 50; a longer chain is invalid. Checked before dkimpy,
# which has no limit and rescans every ARC header for each set (quadratic in sets).
MAX_ARC_SETS = 50


def _verify(view: SyncResolver, message: bytes,
            shared: DkimMessage | None = None) -> ArcResult:
    header = header_section(message)
    if not HAS_ARC.search(header):
        return ArcResult("none")
    seals = sum(1 for _ in zip(range(MAX_ARC_SETS + 1), ARC_SEAL.finditer(header)))
    if seals > MAX_ARC_SETS:
        return ArcResult("fail", reason=f"more than {MAX_ARC_SETS} ARC sets (RFC 8617 4.2.1)")
    result = verify_chain(shared_message(message, shared), make_dnsfunc(view), view.checkpoint)
    log.debug("arc.checked", result=result.result, instances=result.instances,
              reason=result.reason)
    return result


def arc_check(message: bytes, shared: DkimMessage | None = None) -> SyncCheck[ArcResult]:
    """ARC as a check for auth/runner.py: CPU-bound like DKIM, in the "verify" pool;
    `shared`, the message prepared for dkimpy, is shared with the message's DKIM check."""
    inline = len(message) <= INLINE_MAX or not HAS_ARC.search(header_section(message))
    return SyncCheck(functools.partial(_verify, message=message, shared=shared),
                     pool="verify", inline=inline)


def timed_out() -> ArcResult:
    return ArcResult("temperror", reason="ARC verification timed out")
