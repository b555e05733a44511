"""store.lease.attempt_claimed: the batch runner the outbound and webhook workers share.

Plain rows and callables: the runner only sequences them (the workers' own tests run it
against Postgres); here each of its promises is checked on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from structlog.testing import capture_logs

from smtpd_agent.store.lease import LeaseLost, attempt_claimed, poll, stop_polling


@dataclass(frozen=True)
class Row:
    id: int
    workspace_id: int


ROWS = [Row(i, 100 + i) for i in range(1, 7)]
EVENTS = dict(lease_lost="test.lease_lost", failed="test.attempt_error")


async def test_at_most_concurrency_attempts_run_at_once_and_each_row_once() -> None:
    running, peak, seen = 0, 0, []

    async def attempt(row: Row) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        seen.append(row.id)
        running -= 1

    async def release(row: Row) -> None:
        raise AssertionError("nothing is given back while not stopping")

    count = await attempt_claimed(ROWS, attempt, release=release, concurrency=2,
                                  stopping=asyncio.Event(), **EVENTS)
    assert count == len(ROWS)
    assert sorted(seen) == [row.id for row in ROWS]
    assert peak == 2


async def test_once_stopping_rows_not_begun_are_given_back() -> None:
    stopping = asyncio.Event()
    attempted, released = [], []

    async def attempt(row: Row) -> None:
        attempted.append(row.id)
        stopping.set()  # the stop comes while the first attempt is in flight

    async def release(row: Row) -> None:
        released.append(row.id)

    assert await attempt_claimed(ROWS, attempt, release=release, concurrency=1,
                                 stopping=stopping, **EVENTS) == len(ROWS)
    assert attempted == [ROWS[0].id]
    assert released == [row.id for row in ROWS[1:]]


async def test_a_lost_lease_and_a_failure_are_logged_and_the_others_go_on() -> None:
    done = []

    async def attempt(row: Row) -> None:
        if row.id == 2:
            raise LeaseLost("row 2 is no longer ours")
        if row.id == 4:
            raise ValueError("a bug")
        done.append(row.id)

    async def release(row: Row) -> None:
        raise AssertionError("not stopping")

    with capture_logs() as logs:
        await attempt_claimed(ROWS, attempt, release=release, concurrency=3,
                              stopping=asyncio.Event(), **EVENTS)
    assert sorted(done) == [1, 3, 5, 6]
    [lost] = [e for e in logs if e["event"] == "test.lease_lost"]
    assert (lost["delivery_id"], lost["workspace_id"], lost["log_level"]) == (2, 102, "warning")
    assert lost["error"] == "row 2 is no longer ours"
    [failed] = [e for e in logs if e["event"] == "test.attempt_error"]
    assert (failed["delivery_id"], failed["workspace_id"], failed["log_level"]) == \
        (4, 104, "error")
    assert failed["exc_info"] is True


async def test_the_queues_raise_the_one_lease_lost_the_runner_catches() -> None:
    from smtpd_agent.outbound import queue
    from smtpd_agent.store import hooks

    assert queue.LeaseLost is LeaseLost and hooks.LeaseLost is LeaseLost


async def test_stop_polling_lets_a_batch_in_flight_finish() -> None:
    stopping, wake, finished = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def loop() -> None:
        await stopping.wait()
        await asyncio.sleep(0.05)  # the attempt in flight
        finished.set()

    task = asyncio.create_task(loop())
    await stop_polling(task, stopping=stopping, wake=wake, grace=60)
    assert stopping.is_set() and wake.is_set() and finished.is_set() and task.done()


async def test_stop_polling_cancels_a_loop_that_outlasts_its_grace() -> None:
    stopping, wake = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(asyncio.Event().wait())  # never ends by itself
    await stop_polling(task, stopping=stopping, wake=wake, grace=0.05)
    with pytest.raises(asyncio.CancelledError):
        await task
    await stop_polling(None, stopping=stopping, wake=wake, grace=0.05)  # never started


async def test_a_wake_during_a_step_is_not_lost() -> None:
    """New work (or a stop) signalled while a step runs: the loop looks again at once, not
    after its interval (a stop used to wait a whole poll interval, 5 s in tests)."""
    stopping, wake = asyncio.Event(), asyncio.Event()
    steps = 0

    async def step() -> bool:
        nonlocal steps
        steps += 1
        if steps == 1:
            wake.set()  # work arrives while the first step runs
        if steps == 2:
            stopping.set()
            wake.set()  # and a stop while the second does
        return False

    await asyncio.wait_for(poll(step, interval=3600, stopping=stopping, wake=wake), 10)
    assert steps == 2


async def test_a_settle_delay_takes_wake_ups_that_come_together_in_one_step() -> None:
    """poll(settle=...): the search indexer, woken by every commit, waits a moment after a
    wake-up so that one step takes what several commits queued (issue 20)."""
    stopping, wake = asyncio.Event(), asyncio.Event()
    steps: list[int] = []
    queued = [0]

    async def step() -> bool:
        steps.append(queued[0])
        queued[0] = 0
        return False

    async def wait_until(done: Callable[[], bool]) -> None:
        for _ in range(1000):
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the poll loop did not step")

    task = asyncio.create_task(poll(step, interval=30, stopping=stopping, wake=wake,
                                    settle=2.0))
    try:
        await wait_until(lambda: len(steps) == 1)
        for _ in range(5):  # five commits, each announcing its work, within the delay
            queued[0] += 1
            wake.set()
            await asyncio.sleep(0.01)
        await wait_until(lambda: len(steps) == 2)
        assert steps == [0, 5]
        # a stop during the delay ends the loop without waiting the interval
        wake.set()
        await asyncio.sleep(0)
        stopping.set()
        await asyncio.wait_for(task, 10)
    finally:
        task.cancel()


class Announced:
    """A poll loop whose step takes everything announced so far, and a stream of
    announcements (commits, each waking the loop as the outbox's NOTIFY does)."""

    def __init__(self) -> None:
        self.stopping, self.wake = asyncio.Event(), asyncio.Event()
        self.steps: list[int] = []
        self.queued = 0

    async def step(self) -> bool:
        self.steps.append(self.queued)
        self.queued = 0
        return False

    async def every(self, pause: float, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            self.queued += 1
            self.wake.set()
            await asyncio.sleep(pause)

    @contextlib.asynccontextmanager
    async def polling(self, **settle: float) -> AsyncIterator[None]:
        task = asyncio.create_task(poll(self.step, interval=30, stopping=self.stopping,
                                        wake=self.wake, **settle))
        try:
            while not self.steps:  # the first step, before any wake-up
                await asyncio.sleep(0.01)
            yield
        finally:
            self.stopping.set()
            self.wake.set()
            await asyncio.wait_for(task, 10)


async def test_a_burst_of_wake_ups_defers_the_step_until_it_pauses() -> None:
    """poll(settle, settle_max): the search indexer yields while mail keeps arriving
    (issue 20): wake-ups 20 ms apart for 1 s, closer than settle, take no step until
    they stop, then one step takes the whole burst."""
    announced = Announced()
    async with announced.polling(settle=0.3, settle_max=30):
        await announced.every(0.02, 1.0)
        burst = announced.queued
        assert announced.steps == [0]  # nothing during the burst
        for _ in range(300):
            if len(announced.steps) == 2:
                break
            await asyncio.sleep(0.01)
        assert announced.steps == [0, burst] and burst > 20


async def test_a_burst_longer_than_settle_max_is_then_taken_as_it_comes() -> None:
    """The deferral is bounded: wake-ups that do not pause get a step settle_max after
    the first, taking everything so far, and from then on a step every settle (as
    without settle_max), each taking what came meanwhile: a long burst is a steady
    flow, not a reason to wait longer."""
    announced = Announced()
    async with announced.polling(settle=0.3, settle_max=1.0):
        await announced.every(0.02, 3.0)
        during = announced.steps[1:]
        # ~1 s of items (50 at 20 ms) in the first step, then ~0.3 s (15) per step
        assert during and during[0] >= 35, during
        assert len(during) >= 4, during
        assert all(5 <= taken <= 30 for taken in during[1:]), during


async def test_after_a_pause_the_next_burst_is_deferred_again() -> None:
    announced = Announced()
    async with announced.polling(settle=0.3, settle_max=1.0):
        await announced.every(0.02, 1.6)  # into the steady regime
        await asyncio.sleep(0.7)  # a pause: the burst's rest is taken, deferring again
        before = len(announced.steps)
        assert announced.queued == 0
        await announced.every(0.02, 0.6)  # shorter than settle_max
        assert len(announced.steps) == before  # no step during it
        burst = announced.queued
        for _ in range(100):
            if len(announced.steps) > before:
                break
            await asyncio.sleep(0.01)
        assert announced.steps[before:] == [burst] and burst >= 20


async def test_a_stop_during_a_deferral_ends_the_loop_at_once() -> None:
    stopping, wake = asyncio.Event(), asyncio.Event()

    async def step() -> bool:
        return False

    task = asyncio.create_task(poll(step, interval=30, stopping=stopping, wake=wake,
                                    settle=60, settle_max=600))
    await asyncio.sleep(0.05)
    wake.set()
    await asyncio.sleep(0.05)
    stopping.set()
    wake.set()
    await asyncio.wait_for(task, 5)
