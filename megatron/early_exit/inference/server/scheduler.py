"""Continuous batching over the engine's step API: one worker thread owns the engine.

Every loop iteration:
  1. drop cancelled requests (queued ones vanish, running ones free their slots);
  2. admit queued jobs, oldest first, while all of a job's sequences fit into free slots of
     the one `DecodeState` (a job is admitted whole, so a seeded job samples exactly as
     `generate` would), and prefill them together in one pass;
  3. one decode step for every running sequence: sequences whose jobs' strategies share
     passes (`Strategy.shares_passes`: full, early_exit) and whose exit policies are equal
     share one `decode_one_token` pass (each sequence still exits on its own); different
     policies take one pass each over the same cache, since a pass only touches the slots it
     is given; every other job runs its strategy's own round (self_speculative: one
     draft-and-verify round), one round for all greedy jobs whose settings differ only in
     where each sequence stops (`round_groups`);
  4. take tokens per job through the one acceptance path (`Acceptance.accept`, with the job's
     own generator, consumed in the order `generate` consumes it), stream what is new
     (incrementally detokenized: a step costs in proportion to its new tokens), retire
     finished sequences (their slots are reset and reused).

Sampling and stop checks run here on rank 0 only; every call that touches the engine's
state goes through an `EngineDriver`, which under tensor parallelism broadcasts it so the
other ranks replay it (`distributed.py`).

`BaseScheduler` holds what does not depend on how decoding is driven (the queue, admission,
cancellation, streaming and finishing a job); `Scheduler` is the continuous one above, and
`batch_scheduler.BatchScheduler` serves engines that decode whole batches (pipeline parallel).
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference.passes import ExitPolicy, StepOutput
from megatron.early_exit.inference.sampling import make_generator
from megatron.early_exit.inference.server.distributed import EngineDriver
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings, TextState
from megatron.early_exit.inference.strategies import get_strategy
from megatron.early_exit.inference.strategies.base import round_key

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The bounded queue of waiting requests is full (the server answers 503)."""


@dataclass
class Event:
    """What the worker tells a request's handler: new tokens of sequence `index`, done, or an error."""

    kind: str  # "delta" | "done" | "error"
    index: int = 0
    text: str = ""  # streamed text delta (holds back what a stop string or a split character may change)
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    error: Exception | None = None
    logprobs: list[float] = field(default_factory=list)  # of `tokens`, when the job asked for them
    top: list[dict[int, float]] = field(default_factory=list)  # their top alternatives (top_logprobs)


@dataclass(eq=False)  # identity semantics: jobs are dict keys
class Job:
    """One request: `prompts` decoded with one `settings`; results fill in as it runs."""

    prompts: list[list[int]]
    settings: GenerationSettings
    policy: ExitPolicy
    score_prompt: bool = False  # prompt logprobs wanted: prefill returns every row's logits
    top_logprobs: int = 0  # also keep the k most likely tokens at each position
    stream: bool = False
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to the logits before choosing
    counts_as_request: bool = True  # False for all but the last part of a request split into batches
    sink: Callable[[Event], None] = lambda event: None  # thread-safe delivery to the handler
    results: list[GenerationResult] = field(default_factory=list)
    prompt_logprobs: list[list[float | None]] = field(default_factory=list)
    prompt_top: list[list[dict[int, float]]] = field(default_factory=list)
    prompt_exit_layers: list[list[int | None]] = field(default_factory=list)  # the layer each scored token came from
    token_top: list[list[dict[int, float]]] = field(default_factory=list)
    submitted: float = 0.0
    started: float = 0.0
    prefilled: float = 0.0  # when its prefill (and first tokens) were done: decode_tokens_per_sec after it
    finished: float = 0.0
    cancelled: bool = False
    counts: list[list[int]] = field(default_factory=list)  # self-speculative: drafted, accepted

    def __post_init__(self) -> None:
        n = len(self.prompts)
        logprobs = [] if self.settings.return_logprobs else None
        self.results = [GenerationResult(list(p), logprobs=None if logprobs is None else []) for p in self.prompts]
        self.prompt_logprobs, self.prompt_top = [[] for _ in range(n)], [[] for _ in range(n)]
        self.prompt_exit_layers = [[] for _ in range(n)]
        self.token_top, self.counts = [[] for _ in range(n)], [[0, 0] for _ in range(n)]
        self.generator = make_generator(self.settings.seed)
        self.sent = [""] * n  # text streamed so far, per sequence
        self.texts: list[TextState | None] = [None] * n  # incremental detokenization, per streamed sequence
        self.streamed = [0] * n  # tokens streamed so far, per sequence
        self.done = [False] * n

    @property
    def shares_passes(self) -> bool:
        return get_strategy(self.settings.strategy).shares_passes

    @property
    def score_policy(self) -> ExitPolicy:
        """The exits prompt scoring evaluates: the decode steps' own (scored by the `exact` rule,
        scoring.py); none for strategies with their own rounds (self_speculative outputs the
        final head's tokens)."""
        return self.policy if self.shares_passes else ExitPolicy()


@dataclass
class _Seq:
    job: Job
    index: int  # which of the job's prompts

    @property
    def result(self) -> GenerationResult:
        return self.job.results[self.index]


class BaseScheduler(ABC):
    """What every scheduler shares: the bounded queue, admission from any thread, cancellation,
    the worker thread that alone touches the engine (through `driver`), and how a finished or
    failed job is reported (`Job.sink`). Subclasses decide what one worker iteration decodes."""

    def __init__(self, driver: EngineDriver, max_batch_size: int, max_queued: int, metrics=None) -> None:
        self.driver, self.engine = driver, driver.engine
        self.max_batch_size, self.max_queued = max_batch_size, max_queued
        self.metrics = metrics
        self.queue: deque[Job] = deque()
        self.cond = threading.Condition()  # re-entrant lock: helpers take it again
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ----- the handler side ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ee-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the worker after its current iteration, then release the follower ranks."""
        with self.cond:
            self._stopping = True
            self.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            if self._thread.is_alive():
                # Its engine call is still broadcasting or decoding: a "shutdown" broadcast now
                # would interleave with that call's collectives. torchrun reaps the followers.
                log.error("the scheduler is still decoding after 30 s; follower ranks are not released")
                return
        self.driver.shutdown()

    def submit(self, job: Job, *more: Job) -> None:
        """Queue `job` (and `more`, the other parts of one split request) together, or none."""
        jobs = (job, *more)
        for j in jobs:
            if len(j.prompts) > self.max_batch_size:
                raise ValueError(f"prompts: {len(j.prompts)} prompts exceed the batch size {self.max_batch_size}")
        with self.cond:
            if self._waiting() >= self.max_queued:
                raise QueueFull(f"the queue is full ({self.max_queued} waiting requests); retry later")
            for j in jobs:
                j.submitted = time.perf_counter()
                self.queue.append(j)
            self.cond.notify_all()

    def _waiting(self) -> int:
        """Queued jobs that must wait for running ones to finish (called under the lock)."""
        return len(self.queue)

    def cancel(self, job: Job) -> None:
        """The client went away: forget the job (its slots free at the next iteration)."""
        with self.cond:
            if not job.cancelled and not all(job.done):
                job.cancelled = True
                self.cond.notify_all()

    def load(self) -> tuple[int, int]:
        """(queued requests, running sequences)."""
        with self.cond:
            return len(self.queue), self._running()

    # ----- the worker ----------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self._stopping and not self.queue and not self._running():
                    self.cond.wait()
                if self._stopping:
                    return
                for _ in self._drop_cancelled():
                    self._count_cancelled()
                admitted = self._take_admissible()
            try:
                self._iterate(admitted)
            except Exception:  # a bug must not kill the server: log it, fail what was running
                log.exception("scheduler iteration failed")
                self._fail_all_running(RuntimeError("internal error while decoding; see the server log"))

    def _drop_cancelled(self) -> list[Job]:
        """Forget cancelled jobs that are still queued; returns them (called under the lock)."""
        gone = [j for j in self.queue if j.cancelled]
        for j in gone:
            self.queue.remove(j)
        return gone

    def _count_cancelled(self) -> None:
        if self.metrics is not None:
            self.metrics.cancelled()

    # Subclass hooks: what runs, what one iteration takes from the queue and decodes.
    @abstractmethod
    def _running(self) -> int:
        """Sequences being decoded now (called under the lock)."""

    @abstractmethod
    def _take_admissible(self) -> list:
        """Take from the queue what this iteration starts (called under the lock)."""

    @abstractmethod
    def _iterate(self, admitted: list) -> None:
        """Decode: start the admitted work and advance what runs (outside the lock)."""

    def _release(self, job: Job) -> None:  # noqa: B027 (optional hook: batch jobs hold no slots)
        """Give back whatever a failed job held."""

    # ----- results -------------------------------------------------------------------------

    def _stream(self, job: Job, i: int) -> None:
        r, start = job.results[i], job.streamed[i]
        if job.done[i]:  # the final text, once: without a stop token, cut before a stop string
            text = self.engine.acceptance.text(r)
            delta = text[len(job.sent[i]) :] if text.startswith(job.sent[i]) else ""
        else:
            delta = self._new_text(job, i)
        job.sent[i] += delta
        job.streamed[i] = len(r.tokens)
        if delta or len(r.tokens) > start:
            ev = Event("delta", i, delta, r.tokens[start:], r.exit_layers[start:], r.confidences[start:])
            ev.logprobs, ev.top = (r.logprobs or [])[start:], job.token_top[i][start:]
            job.sink(ev)

    def _new_text(self, job: Job, i: int) -> str:
        """The text of sequence i that became stable since the last chunk (cost: the new tokens)."""
        r, detok = job.results[i], self.engine.acceptance.detok
        if job.texts[i] is None:
            job.texts[i] = detok.start(r.prompt_tokens)
        st = job.texts[i]
        detok.feed(st, r.tokens[len(st.ids) - len(r.prompt_tokens) :])
        sent = len(job.sent[i])
        cut = _stable_end(st.text, job.settings.stop_strings, sent)
        return st.text[sent:cut] if cut > sent else ""

    def _finish(self, job: Job) -> None:
        job.finished = time.perf_counter()
        elapsed = max(job.finished - job.started, 1e-9)
        drafts = get_strategy(job.settings.strategy).drafts
        for i, r in enumerate(job.results):
            # the seconds after its prefill are this job's decoding, shared with the jobs beside it
            prefill_s = job.prefilled - job.started if job.prefilled else r.stats.get("prefill_s")
            self.engine.acceptance.finish([r], job.settings, elapsed, [job.counts[i]], 0.0, drafts, prefill_s)
        if self.metrics is not None:
            self.metrics.job_finished(job)
        job.sink(Event("done"))

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            job.done = [True] * len(job.done)
            self._release(job)
            job.sink(Event("error", error=error))

    @abstractmethod
    def _fail_all_running(self, error: Exception) -> None:
        """Fail every running job after the engine raised mid-step."""


class Scheduler(BaseScheduler):
    """Continuous batching over the engine's step API (see the module docstring); `capacity`:
    positions per sequence in the one `DecodeState`."""

    def __init__(self, driver: EngineDriver, max_batch_size: int, capacity: int, max_queued: int, metrics=None):
        super().__init__(driver, max_batch_size, max_queued, metrics)
        self.capacity = capacity
        self.slots: list[_Seq | None] = [None] * max_batch_size

    def start(self) -> None:
        self.driver.new_state(self.max_batch_size, self.capacity)
        super().start()

    def _running(self) -> int:
        return sum(s is not None for s in self.slots)

    def _waiting(self) -> int:
        """Jobs the next iteration admits into free slots are not waiting for room."""
        free, admissible = sum(s is None for s in self.slots), 0
        for job in self.queue:
            if len(job.prompts) > free:
                break
            free, admissible = free - len(job.prompts), admissible + 1
        return len(self.queue) - admissible

    def _iterate(self, admitted: list[tuple[Job, list[int]]]) -> None:
        if admitted:
            self._admit(admitted)
        self._step()

    def _drop_cancelled(self) -> list[Job]:
        gone = super()._drop_cancelled()
        freed = [b for b, s in enumerate(self.slots) if s is not None and s.job.cancelled]
        gone += list({id(self.slots[b].job): self.slots[b].job for b in freed}.values())
        if freed:
            self._free(freed)
        return gone

    def _take_admissible(self) -> list[tuple[Job, list[int]]]:
        free = [b for b, s in enumerate(self.slots) if s is None]
        taken = []
        while self.queue and len(self.queue[0].prompts) <= len(free):
            job = self.queue.popleft()
            slots, free = free[: len(job.prompts)], free[len(job.prompts) :]
            for i, b in enumerate(slots):
                self.slots[b] = _Seq(job, i)
            taken.append((job, slots))
        return taken

    def _free(self, slots: list[int]) -> None:
        """Reset the slots' caches (on every rank) and give them back."""
        self.driver.reset(slots)
        with self.cond:
            for b in slots:
                self.slots[b] = None

    # ----- admission: prefill --------------------------------------------------------------

    def _admit(self, admitted: list[tuple[Job, list[int]]]) -> None:
        """Prefill the admitted jobs: one pass for those that do not score their prompt, one per
        distinct scoring policy for those that do; then score, and accept each first token."""
        now = time.perf_counter()
        passes: dict = {None: {}}  # scoring policy (None: plain prefill) -> {slot: prompt}
        for job, slots in admitted:
            job.started = now
            key = job.score_policy if job.score_prompt else None
            for i, b in enumerate(slots):
                passes.setdefault(key, {})[b] = job.prompts[i]
        outs = []
        for policy, prompts in passes.items():
            if not prompts:
                continue
            try:
                outs.append(self.driver.prefill(prompts) if policy is None else self.driver.score(prompts, policy))
            except Exception as e:  # fail only the jobs of this pass
                log.exception("prefill failed")
                self._fail([job for job, slots in admitted if slots[0] in prompts], e)
        out = _merge(outs)
        done = time.perf_counter()
        for job, slots in admitted:
            job.prefilled = done
            if job.cancelled or all(job.done) or slots[0] not in out.logits:
                continue
            if job.score_prompt:
                self._score_prompt(job, slots, out)
            if job.settings.max_new_tokens == 0:
                job.done = [True] * len(slots)
            else:
                self._accept(job, slots, out)
            self._after_step(job, slots)

    def _score_prompt(self, job: Job, slots: list[int], out: StepOutput) -> None:
        """Log-probability of each prompt token given the ones before it (the first has none),
        from the logits of the exit that row leaves at (`engine.score`), and that exit's layer."""
        for i, b in enumerate(slots):
            logp = torch.log_softmax(out.all_logits[b].float(), -1)  # (R, V)
            ids = torch.tensor(job.prompts[i][1:], device=logp.device)
            picked = logp[:-1].gather(-1, ids[:, None])[:, 0].tolist() if len(ids) else []
            job.prompt_logprobs[i] = [None, *picked]
            job.prompt_exit_layers[i] = [None, *out.row_exit_layer[b][:-1]]
            if job.top_logprobs:
                job.prompt_top[i] = [{}] + [_top(row, job.top_logprobs) for row in logp[:-1]]

    # ----- decoding ------------------------------------------------------------------------

    def _step(self) -> None:
        """One decode step (or one strategy round, for jobs that do not share passes) per running sequence."""
        groups: dict[ExitPolicy, dict[int, int]] = {}  # equal (frozen) policies share a pass
        own_rounds: dict[int, Job] = {}
        for b, seq in enumerate(self.slots):
            if seq is None or seq.job.done[seq.index] or seq.job.cancelled:
                continue
            if not seq.job.shares_passes:
                own_rounds[id(seq.job)] = seq.job
                continue
            groups.setdefault(seq.job.policy, {})[b] = seq.result.tokens[-1]
        for policy, tokens in groups.items():
            jobs = self._jobs_of(tokens)
            try:
                out = self.driver.decode(tokens, policy, all(map(self._argmax_only, jobs)))
            except Exception as e:
                log.exception("decode step failed")
                self._fail(list(jobs), e)
                continue
            for job, slots in jobs.items():
                self._accept(job, slots, out)
                self._after_step(job, slots)
        for jobs in round_groups(own_rounds.values()):
            self._round(jobs)

    def _argmax_only(self, job: Job) -> bool:
        """Whether the job reads nothing of the final head but its greedy token (no top
        alternatives, no logit bias): its steps may take the engine's int8 head."""
        return self.engine.argmax_only(job.settings) and not job.top_logprobs and not job.logit_bias

    def _jobs_of(self, slots) -> dict[Job, list[int]]:
        jobs: dict[Job, list[int]] = {}
        for b in slots:
            jobs.setdefault(self.slots[b].job, []).append(b)
        return jobs

    def _accept(self, job: Job, slots: list[int], out: StepOutput) -> None:
        """Take the job's next tokens through the acceptance path `generate` uses: one draw over
        its sequences in the order the pass produced them (exit order), from its own generator."""
        mine = set(slots)
        seqs = [b for b in out.order() if b in mine]
        index = {b: self.slots[b].index for b in seqs}
        results = {b: job.results[i] for b, i in index.items()}
        running = self.engine.acceptance.accept(out, results, job.settings, job.generator, seqs, job.logit_bias)
        for b, i in index.items():
            if job.top_logprobs:
                job.token_top[i].append(_top(torch.log_softmax(out.logits[b].float(), -1), job.top_logprobs))
            if b not in running:
                job.done[i] = True

    def _round(self, jobs: list[Job]) -> None:
        """One round of the jobs' strategy (on every rank) for their running sequences: one round
        for jobs that can share it (`round_groups`), each sequence stopping by its own settings."""
        mine = {id(job) for job in jobs}
        slots = [
            b
            for b, seq in enumerate(self.slots)
            if seq is not None and id(seq.job) in mine and not seq.job.done[seq.index]
        ]
        seqs = {b: self.slots[b] for b in slots}
        results = {b: seq.result for b, seq in seqs.items()}
        counts = {b: seq.job.counts[seq.index] for b, seq in seqs.items()}
        own = {b: seq.job.settings for b, seq in seqs.items()} if len(jobs) > 1 else None
        try:
            still = set(self.driver.round(slots, results, jobs[0].settings, counts, own))
        except Exception as e:
            log.exception("decoding round failed")
            self._fail(jobs, e)
            return
        for b, seq in seqs.items():
            seq.job.done[seq.index] = b not in still
        for job in jobs:
            self._after_step(job, [b for b, seq in seqs.items() if seq.job is job])

    # ----- results -------------------------------------------------------------------------

    def _after_step(self, job: Job, slots: list[int]) -> None:
        """Stream what is new, free finished sequences, and finish the job when all are done."""
        if job.cancelled:
            return
        if job.stream:
            for b in slots:
                self._stream(job, self.slots[b].index)
        finished = [b for b in slots if job.done[self.slots[b].index]]
        if finished:
            self._free(finished)
        if all(job.done):
            self._finish(job)

    def _release(self, job: Job) -> None:
        slots = [b for b, s in enumerate(self.slots) if s is not None and s.job is job]
        if slots:
            self._free(slots)

    def _fail_all_running(self, error: Exception) -> None:
        jobs = {id(s.job): s.job for s in self.slots if s is not None}
        try:
            self._fail(list(jobs.values()), error)
        except Exception:
            log.exception("could not reset the failed slots")


def _merge(outs: list[StepOutput]) -> StepOutput:
    merged = StepOutput()
    for o in outs:
        names = ("logits", "exit_layer", "confidence", "all_logits", "row_exit_layer", "tokens", "all_tokens")
        for name in (*names, "argmax"):
            getattr(merged, name).update(getattr(o, name))
    return merged


def _top(logp: torch.Tensor, k: int) -> dict[int, float]:
    """The k most likely token ids of one row of log-probabilities [V]."""
    values, ids = logp.topk(min(k, logp.shape[-1]))
    return dict(zip(ids.tolist(), values.tolist()))


def _stable_end(text: str, stops: tuple[str, ...], floor: int) -> int:
    """How much of a running sequence's (incrementally decoded) text later tokens cannot change:
    without a trailing broken UTF-8 character, and without a tail that could be the start of a
    stop string (the final text is cut before a stop string). Looks back no further than `floor`."""
    end = len(text)
    while end > floor and text[end - 1] == "\ufffd":
        end -= 1
    cut = end
    for stop in stops:
        for n in range(min(len(stop) - 1, end), 0, -1):
            if text[end - n : end] == stop[:n]:
                cut = min(cut, end - n)
                break
    return cut


def round_groups(jobs: Iterable[Job]) -> list[list[Job]]:
    """Jobs whose strategies run their own rounds, grouped into those that share one round: greedy
    jobs whose settings are equal but for what one sequence reads alone (`strategies.round_key`:
    its length, stops, seed) share it, so that 16 self-speculative clients cost one batched
    draft-and-verify round a step instead of 16 rounds of one sequence; a sampled job keeps its own
    round (a round consumes one generator)."""
    groups: list[tuple[GenerationSettings | None, list[Job]]] = []
    for job in jobs:
        key = round_key(job.settings) if job.settings.temperature <= 0 else None
        for shared, members in groups:
            if key is not None and shared == key:
                members.append(job)
                break
        else:
            groups.append((key, [job]))
    return [members for _, members in groups]
