"""Pipeline-parallel early-exit decoding (EE-LLM's method, DESIGN.md section 6), batched.

Every rank holds one stage (the same `EarlyExitGPT` with the modules it does not own absent,
optionally TP-sharded) and runs `PipelineEngine.generate` with the same arguments. The
engine composes the pass machinery (`passes.Passes` over this stage's layers) and runs the
ordinary decode loop (`engine.decode_loop`: strategies `full` and `early_exit`, and the one
token-acceptance path) on stage 0, whose `prefill` / `decode_one_token` are the pipelined
step below; the other stages follow. One decode step, for the running sequences of the batch:

- stage 0 embeds the newest tokens and runs its layers; every stage evaluates its own exits
  for the sequences still undecided and decides the tokens of those whose exit fires;
- a stage that can decide something sends stage 0 one *record* per step: (exit layer,
  confidence, greedy token) for every batch slot, layer 0 where it decided nothing; it sends
  it as soon as nothing more can be decided on it, before running its remaining layers;
- the hidden states of *all* sequences go on down the pipeline with a header saying which are
  still undecided, so later stages fill their K/V for the exited tokens right away (no
  pending states, no recomputation); the last stage decides the rest with the final head;
- stage 0 starts the next step once it holds every token, while later stages are still
  busy with the previous one.

Message order is fixed, so nothing deadlocks and every run is the same. Stage s sends a
record in a step iff some sequence reaches it undecided and it can decide (it is the last
stage, or holds an exit the step's policy allows); stage 0 knows both, and receives records
from stages 1, 2, ... in that order until every sequence has its token. Hop messages
(header [B, 2] int64: rows per slot, undecided flag; then hidden [A, R, h]) go from each
stage to the next in step order. Sends are non-blocking and receives blocking; each message
depends only on messages of earlier steps or earlier stages, so the wait graph is acyclic.

Stop conditions: stage 0 alone tracks tokens, stops and max_new_tokens; it ends the loop by
sending an empty header, which every stage forwards and then stops. The results are
broadcast from stage 0 over the pipeline group, so every rank returns the same list.

Sampling (temperature > 0) and log-probabilities need the logits: then the deciding stage
also sends its decided rows' logits [k, V] (k decided, in slot order) and stage 0 samples
them in the single-process order (shallowest exit first, then by slot) with the same
generator, so a seed gives the same tokens as one process. Greedy sends tokens only.

Equivalence with one process: there, an exited token's deeper K/V are recomputed later from
its hidden state at the exit; here the deeper stages compute them at once from that same
state. Tokens and exit layers are equal, confidences equal up to fp32 round-off.

Shape legend: B batch slots, A sequences in a message, R rows per sequence, h hidden, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.early_exit.inference.engine import EarlyExitEngine, decode_loop, new_results
from megatron.early_exit.inference.passes import DecodeState, ExitPolicy, Rows, StepOutput
from megatron.early_exit.inference.settings import GenerationResult, GenerationSettings
from megatron.early_exit.inference.strategies import STRATEGIES, get_strategy
from megatron.early_exit.parallel.dims import ParallelState
from megatron.early_exit.parallel.pipeline import StageSpec

_HOP, _HIDDEN, _RECORD, _LOGITS = 0, 1, 2, 3  # message tags, one channel each


@dataclass
class _Decision:
    layer: int
    confidence: float
    token: int  # greedy token
    logits: torch.Tensor | None  # [V], when sampling or log-probabilities need them


class PipelineEngine(EarlyExitEngine):
    """Early-exit decoding with the model split into pipeline stages; one instance per rank.

    model: this rank's stage (see `inference.parallel.build_stage`); specs: every stage's
    `StageSpec`, the same on all ranks. Strategies registered with `pipeline = True`.
    """

    def __init__(self, model, pstate: ParallelState, specs: list[StageSpec], tokenizer=None) -> None:
        super().__init__(model, tokenizer, layer_range=specs[pstate.pp_rank].layer_range)
        self.pstate, self.specs = pstate, specs
        self.stage = pstate.pp_rank
        self.ranks = pstate.pp_group_ranks  # global rank of each stage
        self.with_logits = False  # this call's steps send logits (sampling or log-probabilities)
        self._sends: list = []

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        """K/V for this stage's layers only; no pending states (every row runs every layer)."""
        return self.passes.new_state(batch, capacity, pending=False)

    def check(self, s: GenerationSettings, prompts: list[list[int]]) -> ExitPolicy:
        """The engine's checks, answered from the config alone (a stage lacks other stages'
        exits), so every rank raises the same error before any message is sent."""
        if s.strategy in STRATEGIES and not get_strategy(s.strategy).pipeline:
            raise ValueError(f"strategy: {s.strategy} is not supported with pipeline parallelism (use TP)")
        return super().check(s, prompts)

    def check_probes(self, allowed: list[int], measure: str) -> None:
        if not self.config.use_exit_confidence_head:
            raise ValueError(f"measure '{measure}' needs confidence probes; this model's exits have none")

    def _decides(self, k: int, policy: ExitPolicy) -> bool:
        """Can stage k decide tokens in a step under `policy`? (Then it sends stage 0 a record.)"""
        if k == len(self.specs) - 1:
            return True
        start, end = self.specs[k].layer_range
        return any(start < n <= end and policy.threshold_of(n) < 1.0 for n in policy.allowed)

    # ----- generation ----------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings: GenerationSettings | None = None) -> list[GenerationResult]:
        """Every rank calls this with the same arguments; every rank gets stage 0's results."""
        return self.decode(prompts, settings)[0]

    @torch.no_grad()
    def decode(
        self, prompts: list[list[int]], settings: GenerationSettings | None = None
    ) -> tuple[list[GenerationResult], DecodeState | None]:
        """`generate`, also returning this stage's decode state (its K/V cache) for inspection."""
        s = settings or GenerationSettings()
        policy = self.check(s, prompts)
        self.passes.profile = s.profile
        results = new_results(prompts, s)
        if s.max_new_tokens == 0:
            return results, None
        state = self.new_state(len(prompts), max(len(p) for p in prompts) + s.max_new_tokens + 1)
        self.with_logits = s.temperature > 0 or s.return_logprobs
        with self.packed:
            if self.stage == 0:
                elapsed, counts, prefill_s = decode_loop(self, state, prompts, results, s, policy)
                self._wait_sends()
                self._send_hop(torch.zeros(len(prompts), 2, dtype=torch.long), None)  # the end
                self.acceptance.finish(results, s, elapsed, counts, state.exit_time, prefill_s=prefill_s)
            else:
                self._follow(state, len(prompts), policy)
        self._wait_sends()
        box = [results]
        if self.pstate.pp_group is not None:
            dist.broadcast_object_list(box, src=self.ranks[0], group=self.pstate.pp_group)
        return box[0], state

    # ----- stage 0's step functions (what `decode_loop` calls) -----------------------------

    def prefill(self, state: DecodeState, prompts: dict[int, list[int]]) -> StepOutput:
        return self._lead_step(state, prompts, ExitPolicy())  # the prefill never exits

    def decode_one_token(self, state: DecodeState, tokens: dict[int, int], policy: ExitPolicy) -> StepOutput:
        return self._lead_step(state, {b: [t] for b, t in tokens.items()}, policy)

    def verify(self, state: DecodeState, tokens: dict[int, list[int]]) -> StepOutput:
        raise ValueError("verify: not available with pipeline parallelism")

    def _lead_step(self, state: DecodeState, feed: dict[int, list[int]], policy: ExitPolicy) -> StepOutput:
        """Stage 0: embed and run the step, then collect every stage's decisions; returns them in
        one process's order (shallowest exit first, then by slot)."""
        rows = self.passes.embed(state, feed)  # rows in slot order
        decided = self._stage_pass(state, rows, set(feed), policy)
        for k in range(1, len(self.specs)):
            if len(decided) == len(feed):
                break
            if self._decides(k, policy):
                decided.update(self._recv_record(k, len(state.fed)))
        out = StepOutput()
        for b in sorted(decided, key=lambda b: (decided[b].layer, b)):
            d = decided[b]
            out.exit_layer[b], out.confidence[b], out.tokens[b] = d.layer, d.confidence, d.token
            if d.logits is not None:
                out.logits[b] = d.logits
        return out

    def _follow(self, state, batch: int, policy: ExitPolicy) -> None:
        """Stages 1..: take each step's rows from the previous stage, until the empty header."""
        step_policy = ExitPolicy()
        while True:
            header = self._recv(torch.empty(batch, 2, dtype=torch.long), self.stage - 1, _HOP).cpu()
            if int(header[:, 0].sum()) == 0:
                self._wait_sends()
                self._send_hop(header, None)
                return
            rows = self._recv_rows(state, header)
            undecided = {b for b in rows.seqs if int(header[b, 1])}
            self._stage_pass(state, rows, undecided, step_policy)
            step_policy = policy

    def _stage_pass(self, state, rows: Rows, undecided: set[int], policy: ExitPolicy) -> dict:
        """This stage's layers over `rows`, its exits for the undecided, the final head on the last
        stage; reports decisions (stage 0 keeps them: returned) and passes every row on."""
        self._wait_sends()  # the previous step's messages: received by now or soon, never cyclically
        p, out, memo, undecided = self.passes, StepOutput(), {}, set(undecided)
        by_depth = p.exits_by_depth(policy)
        last_depth = max(by_depth, default=p.start)
        report = self.stage > 0 and bool(undecided) and self._decides(self.stage, policy)
        for d in range(p.start, p.end + 1):
            if d > p.start:
                p.advance(state, d - 1, rows, memo)
            p.record_block_inputs(state, d, rows)
            for n in by_depth.get(d, []):
                undecided -= p.check_exit(state, n, rows, undecided, policy, out)
            if report and not self._is_last() and (not undecided or d >= last_depth):
                self._send_record(out, len(state.fed))  # stage 0 may go on before our layers end
                report = False
        if self._is_last():
            p.final_head(rows.subset(undecided), False, out)
            if report:
                self._send_record(out, len(state.fed))
        else:
            self._send_hop(_header(rows, undecided, len(state.fed)), rows.x)
        return self._decisions(out)

    def _decisions(self, out: StepOutput) -> dict[int, _Decision]:
        return {
            b: _Decision(
                out.exit_layer[b],
                out.confidence[b],
                int(logits.argmax()),  # = `choose` at temperature 0
                logits if self.with_logits else None,
            )
            for b, logits in out.logits.items()
        }

    # ----- messages ------------------------------------------------------------------------

    def _send_record(self, out: StepOutput, batch: int) -> None:
        """To stage 0: [B, 3] float64 (exit layer or 0, confidence, greedy token); then the decided
        rows' logits [k, V] in slot order when sampling or log-probabilities need them."""
        decisions = self._decisions(out)
        record = torch.zeros(batch, 3, dtype=torch.float64)
        for b, d in decisions.items():
            record[b] = torch.tensor([d.layer, d.confidence, d.token], dtype=torch.float64)
        self._isend(record.to(self.device), 0, _RECORD)
        if self.with_logits and decisions:
            self._isend(torch.stack([decisions[b].logits for b in sorted(decisions)]), 0, _LOGITS)  # (k, V)

    def _recv_record(self, k: int, batch: int) -> dict[int, _Decision]:
        record = self._recv(torch.empty(batch, 3, dtype=torch.float64), k, _RECORD).cpu()
        slots = [b for b in range(batch) if record[b, 0] > 0]
        logits = None
        if self.with_logits and slots:
            logits = self._recv(torch.empty(len(slots), self.vocab, dtype=torch.float32), k, _LOGITS)  # (k, V)
        return {
            b: _Decision(
                int(record[b, 0]), float(record[b, 1]), int(record[b, 2]), None if logits is None else logits[j]
            )
            for j, b in enumerate(slots)
        }

    def _send_hop(self, header: torch.Tensor, x: torch.Tensor | None) -> None:
        if self._is_last():
            return
        self._isend(header.to(self.device), self.stage + 1, _HOP)
        if x is not None:
            self._isend(x, self.stage + 1, _HIDDEN)  # (A, R, h)

    def _recv_rows(self, state: DecodeState, header: torch.Tensor) -> Rows:
        n = header[:, 0].tolist()
        seqs = [b for b in range(len(n)) if n[b] > 0]
        lo = [state.fed[b] for b in seqs]
        for b in seqs:
            state.fed[b] += n[b]
        buf = torch.empty(len(seqs), max(n), self.config.hidden_size, dtype=self.dtype)
        x = self._recv(buf, self.stage - 1, _HIDDEN)  # (A, R, h)
        return Rows(seqs, lo, [n[b] for b in seqs], x)

    def _isend(self, t: torch.Tensor, k: int, tag: int) -> None:
        t = t.contiguous()
        self._sends.append((dist.isend(t, self.ranks[k], tag=tag), t))  # keep t alive until sent

    def _recv(self, buf: torch.Tensor, k: int, tag: int) -> torch.Tensor:
        buf = buf.to(self.device)
        dist.recv(buf, self.ranks[k], tag=tag)
        return buf

    def _wait_sends(self) -> None:
        for work, _ in self._sends:
            work.wait()
        self._sends = []

    def _is_last(self) -> bool:
        return self.stage == len(self.specs) - 1


def _header(rows: Rows, undecided: set[int], batch: int) -> torch.Tensor:
    """[B, 2] int64: rows this step per slot (0 = not in it), and 1 where still undecided."""
    header = torch.zeros(batch, 2, dtype=torch.long)
    for a, b in enumerate(rows.seqs):
        header[b, 0], header[b, 1] = rows.n[a], int(b in undecided)
    return header
