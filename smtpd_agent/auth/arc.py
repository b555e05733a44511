"""ARC (RFC 8617) for the authenticate stage: verify the chain a forwarder (a list) added.

We only validate and record the chain (pass / fail / none, or temperror when a
key could not be fetched); it does not change the DMARC verdict by itself, but
an operator or a later policy can trust `arc=pass` from known forwarders.
dkimpy does the work (on the event loop when the keys are cached, like DKIM,
else in a worker thread), with keys fetched through our resolver; a DNS
temporary error escapes dkimpy (it is not a DKIMException) and becomes
temperror rather than a broken chain.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import dkim
import structlog

from ..dns import DnsTempError, Resolver, SyncResolver
from .dkim import MIN_RSA_BITS, make_dnsfunc, verify_on_loop

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


def verify_chain(message: bytes, dnsfunc: Any) -> ArcResult:
    """Blocking ARC validation (RFC 8617 section 5.2); run it in a thread."""
    try:
        arc = dkim.ARC(message, minkey=MIN_RSA_BITS)
        cv, sets, reason = arc.verify(dnsfunc=dnsfunc)
    except DnsTempError as error:
        return ArcResult("temperror", reason=f"key lookup: {error}")
    except dkim.DKIMException as error:
        return ArcResult("fail", reason=str(error))
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


def _verify(view: SyncResolver, message: bytes) -> ArcResult:
    result = verify_chain(message, make_dnsfunc(view))
    log.debug("arc.checked", result=result.result, instances=result.instances,
              reason=result.reason)
    return result


def verify_arc_cached(resolver: Resolver, message: bytes) -> ArcResult | None:
    return verify_on_loop(resolver, message, _verify, marker=HAS_ARC, absent=ArcResult("none"))


async def verify_arc_in_thread(resolver: Resolver, message: bytes) -> ArcResult:
    return await resolver.in_thread(functools.partial(_verify, message=message))


async def verify_arc(resolver: Resolver, message: bytes) -> ArcResult:
    cached = verify_arc_cached(resolver, message)
    return cached if cached is not None else await verify_arc_in_thread(resolver, message)
