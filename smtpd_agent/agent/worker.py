"""Reply workers: claim a job, decide, ask the model, store the reply.

Stage 6 of the pipeline, as a Service: `serve` runs `agent.workers` of them
beside the listener, `smtpd-agent worker` runs them alone (on any machine
that reaches the database). All coordination goes through the job table, so
any number of processes may run side by side.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from datetime import UTC, datetime

import structlog

from ..addresses import OurDomains, parse_address
from ..config import Settings
from ..runtime import Runtime
from ..store import domains as domain_store
from ..store.lease import poll
from . import caps as limits
from . import recipients as recipient_rules
from . import jobs
from .caps import Caps
from .compose import Original, compose_reply
from .jobs import Job
from .llm import LLM, Completion, classify_error, deprecation_of
from .policy import (
    agent_address,
    loop_skip_reason,
    parent_domains,
    reply_address,
    retry_delay,
)
from .prompt import build_prompt, one_correspondent

log = structlog.get_logger("smtpd_agent.agent")

NO_LLM = "no LLM configured"
# Seconds a stopping worker gives back its claimed job in (then the lease takes over).
RELEASE_TIMEOUT = 2.0


class AgentWorkers:
    """`agent.workers` concurrent loops over the job queue, sharing one API client."""

    def __init__(self, runtime: Runtime, concurrency: int | None = None) -> None:
        self.runtime = runtime
        self.settings: Settings = runtime.settings
        self.concurrency = self.settings.agent.workers if concurrency is None else concurrency
        self.llm: LLM | None = None
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.name = f"{socket.gethostname()}:{os.getpid()}"

    async def start(self) -> None:
        agent = self.settings.agent
        if self.concurrency < 1:
            log.info("agent.workers.off", reason="agent.workers is 0")
            return
        if agent.api_key:
            # In a thread: importing the SDK builds its pydantic models (seconds of CPU on a
            # small host), and the SMTP listener already accepts on this loop.
            self.llm = await asyncio.to_thread(LLM, agent)
            end_of_life = deprecation_of(agent.model)
            if end_of_life:
                log.warning("agent.model_deprecated", model=agent.model, end_of_life=end_of_life)
        elif agent.offline_reply:
            log.warning("agent.offline", reason="ANTHROPIC_API_KEY is not set: mail is "
                        "answered with agent.offline_reply")
        else:
            log.warning("agent.offline", reason="ANTHROPIC_API_KEY is not set: jobs are "
                        f"recorded as skipped ({NO_LLM})")
        for index in range(self.concurrency):
            self._tasks.append(asyncio.create_task(self._loop(f"{self.name}:{index}"),
                                                   name=f"agent-worker-{index}"))
        log.info("agent.workers.started", workers=self.concurrency, worker=self.name,
                 model=agent.model if self.llm else None,
                 base_url=agent.base_url or None, lease=agent.lease)

    async def stop(self) -> None:
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self.llm is not None:
            await self.llm.close()
        log.info("agent.workers.stopped", worker=self.name)

    async def _loop(self, worker: str) -> None:
        db = self.runtime.pool
        agent = self.settings.agent

        async def step() -> bool:
            job = await jobs.claim(db, worker, agent.lease)
            if job is None:
                return False
            try:
                await self.process(job, worker)
            except asyncio.CancelledError:
                try:
                    await asyncio.wait_for(jobs.release(db, job), RELEASE_TIMEOUT)
                except Exception as error:  # noqa: BLE001 - the lease expires anyway
                    log.warning("agent.release_failed", job=job.id, error=str(error))
                raise
            except Exception as error:  # a bug, or the database: the lease brings it back
                log.exception("agent.job_error", job=job.id, error=str(error))
            return True

        await poll(step, interval=agent.poll_interval, stopping=self._stopping, name=worker)

    def caps(self) -> Caps:
        return Caps.of(self.settings.agent)

    async def process(self, job: Job, worker: str) -> None:
        """One claimed job to a final state (done, skipped, failed) or back to pending."""
        db = self.runtime.pool
        settings = self.settings.agent
        bound = log.bind(job=job.id, workspace=job.workspace_id, agent_id=job.agent_id,
                         attempt=job.attempts, worker=worker)
        if job.attempts > settings.max_attempts:
            # Claimed that often without finishing: workers died or hung on it.
            error = f"gave up after {settings.max_attempts} attempts (lease expired)"
            await jobs.fail(db, job, error)
            bound.warning("agent.failed", error=error)
            return
        agent = await jobs.load_agent(db, job)
        inbound = await jobs.load_inbound(db, job)
        if agent is None or inbound is None:
            await jobs.skip(db, job, "message or agent deleted")
            bound.info("agent.skipped", reason="message or agent deleted")
            return
        reason = None
        if not agent.enabled or not agent.auto_reply:
            reason = "agent disabled" if not agent.enabled else "auto-reply off"
        senders = [a for a in (inbound.facts.mail_from, inbound.message.from_address)
                   if a and "@" in a]
        custom = await jobs.custom_domains_among(
            db, [d for a in senders for d in parent_domains(a.rpartition("@")[2])])
        reason = reason or loop_skip_reason(inbound.facts, self.settings.server.default_domain,
                                            custom)
        to_address = reply_address(inbound.message.from_address, inbound.message.reply_to)
        if reason is None and to_address is None:
            reason = "no usable correspondent address"
        if reason is None and to_address is not None:
            # the suppression list and the allow/block lists, as for API sends; the outbound
            # queue applies them again, asking here saves the model call
            refusal = await recipient_rules.check(db, job.workspace_id, job.agent_id,
                                                  (to_address,))
            reason = refusal.reason if refusal else None
        caps = self.caps()
        if reason is None and to_address is not None:
            # checked again under the workspace's lock when the reply is stored
            refused = await limits.check(db, job.workspace_id, job.agent_id, (to_address,),
                                         caps)
            reason = refused.reason if refused else None
        if reason is None and self.llm is None and not settings.offline_reply:
            reason = NO_LLM
        if reason is not None or to_address is None:
            await jobs.skip(db, job, reason or "no usable correspondent address")
            bound.info("agent.skipped", reason=reason)
            return

        ours = OurDomains(self.settings.server.default_domain)
        rcpt = parse_address(inbound.message.rcpt_to or "")
        rcpt_domain = rcpt.domain if rcpt else None
        custom_ok = (rcpt_domain is not None and not ours.is_ours(rcpt_domain)
                     and await domain_store.receives_for(db, job.workspace_id, rcpt_domain))
        address = agent_address(agent.handle, agent.workspace_slug, rcpt_domain, ours, custom_ok)
        identity = f"{agent.display_name} <{address}>" if agent.display_name else address
        correspondent = inbound.message.from_address or to_address
        transcript = one_correspondent(
            await jobs.load_transcript(db, job, correspondent, to_address), correspondent,
            to_address)
        prompt = build_prompt(identity, agent.system_prompt, transcript,
                              nonce=secrets.token_hex(8), max_body_chars=settings.max_body_chars)
        try:
            completion = (await self.llm.complete(prompt) if self.llm is not None
                          else Completion(settings.offline_reply, "canned", 0, 0, 0))
        except Exception as error:  # noqa: BLE001 - every API failure is classified
            call = classify_error(error)
            if call.outcome == "retry" and job.attempts < settings.max_attempts:
                delay = retry_delay(job.attempts, settings.backoff_base, settings.backoff_max,
                                    call.retry_after)
                await jobs.retry_later(db, job, call.error, delay)
                bound.warning("agent.retry", error=call.error, delay=delay)
            else:
                await jobs.fail(db, job, call.error)
                bound.error("agent.failed", error=call.error)
            return
        if not completion.text.strip():
            await jobs.fail(db, job, "the model returned no text")
            bound.error("agent.failed", error="empty completion")
            return
        reply = compose_reply(Original.of(inbound.message),
                              agent.display_name, address, to_address, completion.text,
                              datetime.now(UTC))
        if agent.reply_mode == "draft":
            finished = await jobs.store_draft(db, job, reply, completion)
            if finished.stored:
                bound.info("agent.drafted", draft=finished.draft_id, to=to_address,
                           input_tokens=completion.input_tokens,
                           output_tokens=completion.output_tokens)
            else:
                bound.warning("agent.draft_dropped", reason=finished.reason)
            return
        finished = await jobs.store_reply(db, job, reply, completion, caps)
        if finished.stored:
            bound.info("agent.replied", reply=finished.reply_id, to=to_address,
                       message_id=reply.message_id, input_tokens=completion.input_tokens,
                       output_tokens=completion.output_tokens, latency_ms=completion.latency_ms)
        else:
            bound.warning("agent.reply_dropped", reason=finished.reason)
