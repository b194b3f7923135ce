"""Batch-at-a-time scheduling, for engines that decode whole batches (pipeline parallelism).

`PipelineEngine` runs its own generation loop across the stages (EE-LLM's pipeline early
exit), not the step API that continuous batching needs. So the worker serves the queue in
batches: it takes the oldest waiting job and every later one that can share its `generate`
call, decodes them together in one call (which `EngineDriver` broadcasts, so that every rank
makes it), and completes them. Jobs that arrive meanwhile wait for the running batch.

A batch shares one `GenerationSettings` (strategy, threshold, lengths, sampling, stops), so
jobs join only with equal settings, up to `max_batch_size` sequences. A seeded sampling job
decodes alone: its draws come from one generator over the whole batch, and alone they are the
ones `generate` gives for it. Greedy jobs batch freely (their tokens do not depend on the
batch).

Streaming: a streamed job gets, after its batch, one chunk per sequence with its whole text,
tokens and exit layers, then the end of the stream (there are no partial results to send
while the pipeline decodes).

Prompt scoring and top alternatives need logits that `generate` does not return; the server
refuses such requests with a 400 before they are queued (`requests.Context.batch_at_a_time`).
"""

from __future__ import annotations

import logging
import time
from collections import deque

from megatron.early_exit.inference.server.distributed import EngineDriver
from megatron.early_exit.inference.server.scheduler import BaseScheduler, Job

log = logging.getLogger(__name__)


class BatchScheduler(BaseScheduler):
    """Owns a whole-batch engine through `driver`; one `generate` call per worker iteration."""

    def __init__(self, driver: EngineDriver, max_batch_size: int, max_queued: int, metrics=None) -> None:
        super().__init__(driver, max_batch_size, max_queued, metrics)
        self.batch: list[Job] = []  # the jobs being decoded now

    def _running(self) -> int:
        return sum(len(j.prompts) for j in self.batch)

    def _waiting(self) -> int:
        """With no batch running, the jobs of the next one are not waiting for room."""
        if self.batch:
            return len(self.queue)
        return len(self.queue) - len(take_batch(deque(self.queue), self.max_batch_size))

    def _take_admissible(self) -> list[Job]:
        self.batch = take_batch(self.queue, self.max_batch_size)
        return self.batch

    def _iterate(self, admitted: list[Job]) -> None:
        try:
            if admitted:
                self._decode(admitted)
        finally:
            with self.cond:
                self.batch = []

    def _decode(self, jobs: list[Job]) -> None:
        """One `generate` call on every rank for all the jobs' prompts; then complete each job."""
        now = time.perf_counter()
        for job in jobs:
            job.started = now
        prompts = [p for job in jobs for p in job.prompts]
        try:
            results = self.driver.generate(prompts, jobs[0].settings)
        except Exception as e:  # the same on every rank (the engine checks before any message)
            log.exception("batch decoding failed")
            self._fail(jobs, e)
            return
        for job in jobs:
            n = len(job.prompts)
            job.results[:], results = results[:n], results[n:]
            job.done = [True] * n  # before any event: a late cancel is then a no-op
            if job.cancelled:  # its client went away while the batch ran
                self._count_cancelled()
                continue
            if job.stream:
                for i in range(n):
                    self._stream(job, i)
            self._finish(job)

    def _fail_all_running(self, error: Exception) -> None:
        with self.cond:
            jobs = [j for j in self.batch if not all(j.done)]
        self._fail(jobs, error)


def take_batch(queue: deque[Job], max_sequences: int) -> list[Job]:
    """Remove from `queue` and return the oldest job plus every later one that can share its
    `generate` call (equal settings, not seeded sampling), while the sequences fit."""
    if not queue:
        return []
    head = queue[0]
    batch, n = [head], len(head.prompts)
    if _shareable(head):
        for job in list(queue)[1:]:
            if _shareable(job) and job.settings == head.settings and n + len(job.prompts) <= max_sequences:
                batch.append(job)
                n += len(job.prompts)
    for job in batch:
        queue.remove(job)
    return batch


def _shareable(job: Job) -> bool:
    """A seeded sampling job must decode alone to draw what `generate` would draw for it."""
    s = job.settings
    return s.temperature == 0 or s.seed is None
