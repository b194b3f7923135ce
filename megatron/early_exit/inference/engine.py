"""Batched early-exit generation that keeps the KV cache exact (DESIGN.md section 6).

The engine is gpt-fast shaped: a KV cache allocated once per batch (`KVCache`), explicit
positions through every layer, and small step functions (`prefill`, `decode_one_token`,
`verify`) that the strategies in `generate` are written with.

One *pass* pushes, for every sequence in it, the rows that lack K/V at each layer through
that layer. At layer i the rows of sequence b are its positions [filled[i, b], end), where
`end` is how far depth i reaches: the states of earlier tokens that exited after exactly i
layers ("pending", remembered at their exit depth), then the rows carried up from layer
i-1 (which end with the newest token). This is EE-LLM's KV recomputation: a deeper layer's
missing K/V are computed from exactly the input the full model would have given it, the
next time a token of that sequence goes deeper, inside the same batched pass. Every
sequence has its own positions (starting at 0) and its own number of rows; rows are
right-padded to the longest in the pass and the padding is masked out.

An exit at layer n reads the hidden state after `depth(n)` layers: n, or n - 1 with
`pre_exit`. An exit with its own transformer block (`use_exit_block`) keeps its own KV
cache; its inputs are recorded as rows pass its depth and the block catches up lazily, only
when the exit is evaluated.

Shape legend: B batch slots, A sequences in one pass, R rows per sequence in that pass
(padded), T cache capacity, h hidden, V vocabulary (real, unpadded).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference import confidence as conf_measures
from megatron.early_exit.inference.kv_cache import KVCache, RowIndex
from megatron.early_exit.inference.packed import enable_packed_weights
from megatron.early_exit.inference.sampling import choose, make_generator

STRATEGIES = ("full", "early_exit", "self_speculative")


@dataclass
class GenerationSettings:
    """Everything one `generate` call can be asked for (see `generate` for the meaning)."""

    strategy: str = "full"
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False
    early_exit_threshold: float = 0.8
    exit_thresholds: dict[int, float] | None = None  # per-exit thresholds (calibrated); override the above
    exit_layers: tuple[int, ...] | None = None
    min_exit_layer: int | None = None
    measure: str = "max_prob"
    num_draft_tokens: int = 4
    draft_exit_layer: int | None = None
    return_logprobs: bool = False
    profile: bool = False


@dataclass
class GenerationResult:
    """One prompt's output. Lists have one entry per generated token.

    exit_layers: the exit each token left at (its layer number; num_layers = the final head).
    confidences: the confidence of the head that produced the token (the chosen measure for
    an exit, max probability for the final head and for self-speculative drafts).
    logprobs: log-probability of each token under the distribution it was chosen from (the
    final head's for self-speculative, whose output is the final model's); None unless asked.
    finish_reason: "stop" (EOS, a stop token or a stop string) or "length"; stopped_by
    says which. text: the generated text (None without a tokenizer), without a final EOS or
    stop token and cut before a stop string; `tokens` keep everything generated.
    stats: tokens_per_sec (the whole batch's throughput), elapsed_s, average_exit_layer,
    exit_share {layer: share of this sequence's tokens}, early_exit_share, and for
    self_speculative drafted, accepted and acceptance_rate; exit_time_share with `profile`.
    """

    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)
    logprobs: list[float] | None = None
    text: str | None = None
    finish_reason: str = "length"
    stopped_by: int | str | None = None
    stats: dict = field(default_factory=dict)


@dataclass
class ExitPolicy:
    """Which exits a pass evaluates and when they fire. The default runs the full model."""

    allowed: tuple[int, ...] = ()  # exit layer numbers that may fire
    threshold: float = 1.0
    measure: str = "max_prob"
    force: int | None = None  # this exit always fires (self-speculative drafting)
    per_exit: dict[int, float] | None = None  # per-exit thresholds, overriding `threshold`

    def threshold_of(self, n: int) -> float:
        return self.per_exit.get(n, self.threshold) if self.per_exit else self.threshold


@dataclass
class StepOutput:
    """What one pass produced for each sequence b that got a token out of it."""

    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # b -> [V] logits of the newest token
    exit_layer: dict[int, int] = field(default_factory=dict)
    confidence: dict[int, float] = field(default_factory=dict)
    all_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # b -> [R, V] final logits of every row


@dataclass
class DecodeState:
    """Per-batch state: the caches and how far each sequence has been fed."""

    cache: KVCache
    pending: torch.Tensor  # [B, T+1, h]: hidden state of each early-exited position at its exit depth
    fed: list[int]  # positions 0..fed-1 of sequence b have been embedded
    exit_cache: KVCache | None = None  # one "layer" per exit with a transformer block
    exit_inputs: torch.Tensor | None = None  # [E, B, T+1, h] block inputs per position
    exit_time: float = 0.0


@dataclass
class _Rows:
    """A pass's rows at some depth: sequence b = seqs[a] has rows x[a, :n[a]] at positions lo[a]..lo[a]+n[a]-1."""

    seqs: list[int]
    lo: list[int]
    n: list[int]
    x: torch.Tensor  # (A, R, h)


class EarlyExitEngine:
    """Decoding for one `EarlyExitGPT` on one device. Not thread-safe: one batch at a time."""

    def __init__(self, model, tokenizer=None, packed_weights: bool = True) -> None:
        """packed_weights: on CPU, run Linears and heads on oneDNN-prepacked weights
        (`inference/packed.py`: 2-3x the weight bandwidth of `F.linear` at decode sizes)."""
        self.model = model.eval()
        self.packed_weights = enable_packed_weights(model) if packed_weights else False
        self.tokenizer = tokenizer
        self.config = model.config
        self.num_layers = self.config.num_layers
        self.vocab = self.config.real_vocab_size or self.config.vocab_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.exits = list(self.config.exit_layer_nums)
        # Exits with a transformer block that this model holds (all of them, or a pipeline stage's own).
        own = model.exit_layer_numbers
        self.block_slots = {n: s for s, n in enumerate(n for n in own if model.exits[str(n)].block is not None)}
        self.kv_groups = local_kv_groups(model)

    def draft_exits(self) -> list[int]:
        """Exits self-speculative decoding can draft from: those with layers left to verify."""
        return [n for n in self.exits if self.depth(n) < self.num_layers]

    def depth(self, n: int) -> int:
        """How many layers run before exit n reads the hidden state."""
        return n - 1 if self.config.pre_exit else n

    # ----- state and step functions --------------------------------------------------------

    def new_state(self, batch: int, capacity: int) -> DecodeState:
        c = self.config
        groups, hidden = self.kv_groups, c.hidden_size
        cache = KVCache(self.num_layers, batch, capacity, groups, c.head_dim, self.dtype, self.device)
        state = DecodeState(
            cache, torch.zeros(batch, capacity + 1, hidden, dtype=self.dtype, device=self.device), [0] * batch
        )
        if self.block_slots:
            e = len(self.block_slots)
            state.exit_cache = KVCache(e, batch, capacity, groups, c.head_dim, self.dtype, self.device)
            state.exit_inputs = torch.zeros(e, batch, capacity + 1, hidden, dtype=self.dtype, device=self.device)
        return state

    @torch.no_grad()
    def prefill(self, state: DecodeState, prompts: dict[int, list[int]]) -> StepOutput:
        """Whole prompts through every layer (no exits); the final head only on each last position."""
        return self._forward(state, prompts, ExitPolicy())

    @torch.no_grad()
    def decode_one_token(self, state: DecodeState, tokens: dict[int, int], policy: ExitPolicy) -> StepOutput:
        """Feed one token per sequence; each goes as deep as `policy` lets it (pending rows catch up)."""
        return self._forward(state, {b: [t] for b, t in tokens.items()}, policy)

    @torch.no_grad()
    def verify(self, state: DecodeState, tokens: dict[int, list[int]]) -> StepOutput:
        """Run every pending row (and `tokens`, fed whole) through the remaining layers; final
        logits of all those rows in `all_logits` (self-speculative verification)."""
        return self._forward(state, tokens, ExitPolicy(), all_rows=True)

    def _forward(self, state, new_tokens: dict[int, list[int]], policy: ExitPolicy, all_rows=False) -> StepOutput:
        out, cache = StepOutput(), state.cache
        rows = self._embed(state, new_tokens)
        has_new = {b for b, t in new_tokens.items() if t}
        active = list(new_tokens)
        by_depth: dict[int, list[int]] = {}
        for n in sorted(set(policy.allowed) | ({policy.force} if policy.force is not None else set())):
            by_depth.setdefault(self.depth(n), []).append(n)
        layouts: dict[tuple, tuple] = {}  # one RowIndex (+ rotary) per distinct layout of this pass
        for d in range(self.num_layers + 1):
            if d > 0:
                rows = self._gather(state, d - 1, rows, active)
                if rows is None:
                    return out
                rows.x = self._run_layer(d - 1, rows, cache, layouts)
                for a, b in enumerate(rows.seqs):
                    cache.filled[d - 1, b] = rows.lo[a] + rows.n[a]
            self._record_block_inputs(state, d, rows)
            for n in by_depth.get(d, []):
                fired = self._check_exit(state, n, rows, has_new, policy, out)
                if fired:
                    self._remember_pending(state, rows, fired)
                    active = [b for b in active if b not in fired]
                    keep = [a for a, b in enumerate(rows.seqs) if b not in fired]
                    n_keep = [rows.n[a] for a in keep]
                    # Trim the padding too: the longest rows may have left (the layout has R = max(n)).
                    rows = _Rows(
                        [rows.seqs[a] for a in keep],
                        [rows.lo[a] for a in keep],
                        n_keep,
                        rows.x[keep, : max(n_keep, default=1)],
                    )
        self._final_head(rows, all_rows, out)
        return out

    def _embed(self, state: DecodeState, new_tokens: dict[int, list[int]]) -> _Rows:
        seqs = [b for b, t in new_tokens.items() if t]
        lo = [state.fed[b] for b in seqs]
        n = [len(new_tokens[b]) for b in seqs]
        r = max(n, default=1)
        ids = torch.zeros(len(seqs), r, dtype=torch.long)
        pos = torch.zeros(len(seqs), r, dtype=torch.long)
        for a, b in enumerate(seqs):
            ids[a, : n[a]] = torch.tensor(new_tokens[b])
            pos[a, : n[a]] = torch.arange(lo[a], lo[a] + n[a])
            state.fed[b] += n[a]
        x = self.model.embedding(ids.to(self.device), pos.to(self.device))  # (A, R, h)
        return _Rows(seqs, lo, n, x)

    def _gather(self, state: DecodeState, i: int, rows: _Rows, active: list[int]) -> _Rows | None:
        """The rows layer i must process: pending states at depth i, then the carried rows."""
        filled = state.cache.filled
        carried = {b: a for a, b in enumerate(rows.seqs)}
        seqs, los, parts, same = [], [], [], True
        for b in active:
            lo = int(filled[i, b])
            end = state.fed[b] if i == 0 else int(filled[i - 1, b])
            if end <= lo:
                continue
            a = carried.get(b)
            c_lo = rows.lo[a] if a is not None else end
            piece = []
            if c_lo > lo:  # positions that exited after exactly i layers: recompute them now
                piece.append(state.pending[b, lo:c_lo])
                same = False
            if a is not None:
                piece.append(rows.x[a, : rows.n[a]])
            seqs.append(b)
            los.append(lo)
            parts.append(piece)
        if not seqs:
            return None
        if same and seqs == rows.seqs:
            return rows  # the usual decode step: nothing pending, nobody left
        n = [sum(p.shape[0] for p in piece) for piece in parts]
        x = rows.x.new_zeros(len(seqs), max(n), rows.x.shape[-1])  # (A, R, h)
        for a, piece in enumerate(parts):
            x[a, : n[a]] = torch.cat(piece) if len(piece) > 1 else piece[0]
        return _Rows(seqs, los, n, x)

    def _layout(self, cache: KVCache, seqs: list[int], lo: list[int], n: list[int], memo: dict) -> tuple:
        key = (id(cache), tuple(seqs), tuple(lo), tuple(n))
        if key not in memo:
            index = RowIndex(seqs, lo, n, cache, self.device)
            rotary = self.model.rotary(index.positions) if self.model.rotary is not None else None
            memo[key] = (index, rotary)
        return memo[key]

    def _run_layer(self, i: int, rows: _Rows, cache: KVCache, memo: dict) -> torch.Tensor:
        index, rotary = self._layout(cache, rows.seqs, rows.lo, rows.n, memo)
        return self.model.decoder.layers[str(i)](rows.x, rotary, index.attn_mask, cache.layer(i, index))

    # ----- exits ---------------------------------------------------------------------------

    def _record_block_inputs(self, state: DecodeState, d: int, rows: _Rows) -> None:
        """Exits with a transformer block need their input at every position: keep it as it passes."""
        for n, slot in self.block_slots.items():
            if self.depth(n) != d:
                continue
            for a, b in enumerate(rows.seqs):
                state.exit_inputs[slot, b, rows.lo[a] : rows.lo[a] + rows.n[a]] = rows.x[a, : rows.n[a]]

    def _check_exit(self, state, n: int, rows: _Rows, has_new: set, policy: ExitPolicy, out: StepOutput) -> set[int]:
        """Exit n's decision for the newest token of each sequence in `rows`; returns who leaves."""
        forced = policy.force == n
        threshold = policy.threshold_of(n)
        if not forced and threshold >= 1.0:
            return set()  # threshold 1.0 never exits: do not even evaluate the head
        cand = [a for a, b in enumerate(rows.seqs) if b in has_new]
        if not cand:
            return set()
        start = _tick(self.device) if self._profile else 0.0
        head, model = self.model.exits[str(n)], self.model
        seqs = [rows.seqs[a] for a in cand]
        if head.block is not None:
            hidden = self._block_exit_hidden(state, n, head, seqs)
        else:
            idx = torch.tensor(cand, device=self.device)
            last = rows.x[idx, torch.tensor([rows.n[a] - 1 for a in cand], device=self.device)]  # (A, h)
            hidden = head.hidden(last[:, None])  # (A, 1, h)
        if policy.measure == "learned" and not forced:
            conf = conf_measures.learned(head, hidden)  # (A,): no vocabulary projection for exits that stay
            fire = (conf >= threshold).nonzero().flatten().tolist()
            logits = None
            if fire:
                sel = torch.tensor(fire, device=self.device)
                logits = self._vocab(head.project(hidden[sel], model.tied_output_weight(), model.head_ops)[:, 0])
        else:
            logits = self._vocab(head.project(hidden, model.tied_output_weight(), model.head_ops)[:, 0])  # (A, V)
            conf = conf_measures.from_logits(logits, "max_prob" if forced else policy.measure)
            fire = list(range(len(cand))) if forced else (conf >= threshold).nonzero().flatten().tolist()
            if len(fire) < len(cand):
                logits = logits[torch.tensor(fire, dtype=torch.long, device=self.device)]
        conf_list = conf.tolist()
        for j, a in enumerate(fire):  # logits row j belongs to candidate a
            b = seqs[a]
            out.logits[b], out.exit_layer[b], out.confidence[b] = logits[j], n, conf_list[a]
        if self._profile:
            state.exit_time += _tick(self.device) - start
        return {seqs[a] for a in fire}

    def _block_exit_hidden(self, state: DecodeState, n: int, head, seqs: list[int]) -> torch.Tensor:
        """Bring exit n's own block cache up to each sequence's newest token; its hidden there [A, 1, h]."""
        slot, cache = self.block_slots[n], state.exit_cache
        lo = [int(cache.filled[slot, b]) for b in seqs]
        cnt = [state.fed[b] - lo[a] for a, b in enumerate(seqs)]
        x = state.exit_inputs.new_zeros(len(seqs), max(cnt), self.config.hidden_size)  # (A, R, h)
        for a, b in enumerate(seqs):
            x[a, : cnt[a]] = state.exit_inputs[slot, b, lo[a] : state.fed[b]]
        index, rotary = self._layout(cache, seqs, lo, cnt, {})
        h = head.hidden(x, rotary, index.attn_mask, cache.layer(slot, index))  # (A, R, h)
        for b in seqs:
            cache.filled[slot, b] = state.fed[b]
        last = torch.tensor([c - 1 for c in cnt], device=self.device)
        return h[torch.arange(len(seqs), device=self.device), last][:, None]

    def _remember_pending(self, state: DecodeState, rows: _Rows, fired: set[int]) -> None:
        """Rows that stop here keep their hidden state: the deeper layers' input, for later."""
        for a, b in enumerate(rows.seqs):
            if b in fired:
                state.pending[b, rows.lo[a] : rows.lo[a] + rows.n[a]] = rows.x[a, : rows.n[a]]

    def _final_head(self, rows: _Rows, all_rows: bool, out: StepOutput) -> None:
        if not rows.seqs:
            return
        m = self.model
        if all_rows:
            logits = self._vocab(m.head_ops.project(m.decoder.final_layernorm(rows.x), m.output_weight()))  # (A, R, V)
            for a, b in enumerate(rows.seqs):
                out.all_logits[b] = logits[a, : rows.n[a]]
            last = torch.stack([logits[a, rows.n[a] - 1] for a in range(len(rows.seqs))])
        else:
            idx = torch.arange(len(rows.seqs), device=self.device)
            h = rows.x[idx, torch.tensor(rows.n, device=self.device) - 1]  # (A, h): only the newest rows
            last = self._vocab(m.head_ops.project(m.decoder.final_layernorm(h), m.output_weight()))  # (A, V)
        conf = conf_measures.from_logits(last, "max_prob").tolist()
        for a, b in enumerate(rows.seqs):
            out.logits[b], out.exit_layer[b], out.confidence[b] = last[a], self.num_layers, conf[a]

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Whole-vocabulary logits (the head ops all-gather the shards under TP; identity
        on one device), without the padded entries (never tokens), in fp32."""
        return self.model.head_ops.full_logits(logits)[..., : self.vocab].float()

    # ----- validation ----------------------------------------------------------------------

    def check(self, s: GenerationSettings, prompts: list[list[int]]) -> ExitPolicy:
        """Raise ValueError naming the bad setting; returns the exit policy of decode steps."""
        _check_values(s)
        if not prompts:
            raise ValueError("prompts: give at least one prompt")
        for j, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompts[{j}] is empty: every prompt needs at least one token")
            if min(p) < 0 or max(p) >= self.config.vocab_size:
                raise ValueError(f"prompts[{j}] has token ids outside 0..{self.config.vocab_size - 1}")
        c = self.config
        allowed = list(s.exit_layers) if s.exit_layers is not None else list(self.exits)
        unknown = [n for n in allowed if n not in self.exits]
        if unknown:
            raise ValueError(f"exit_layers: {unknown} are not exits of this model (it has {self.exits or 'none'})")
        if s.min_exit_layer is not None:
            if not 1 <= s.min_exit_layer <= c.num_layers:
                raise ValueError(f"min_exit_layer must be in 1..{c.num_layers}, got {s.min_exit_layer}")
            allowed = [n for n in allowed if n >= s.min_exit_layer]
        if s.strategy == "early_exit" and s.measure == "learned":
            missing = [n for n in allowed if self.model.exits[str(n)].confidence is None]
            if missing:
                raise ValueError(f"measure 'learned' needs confidence probes; exits {missing} have none")
        if s.strategy == "self_speculative":
            if s.temperature > 0:
                raise ValueError("self_speculative decoding is greedy only: use temperature 0")
            if not self.exits:
                raise ValueError("self_speculative needs a model with exits")
            drafts = self.draft_exits()
            if not drafts:
                raise ValueError("self_speculative needs an exit below the last layer to draft from")
            if s.draft_exit_layer is not None and s.draft_exit_layer not in drafts:
                raise ValueError(
                    f"draft_exit_layer: {s.draft_exit_layer} is not an exit below the last layer (choose from {drafts})"
                )
        longest = max(len(p) for p in prompts)
        if c.position_embedding_type == "learned_absolute" and longest + s.max_new_tokens > c.max_position_embeddings:
            raise ValueError(
                f"max_new_tokens: prompt ({longest}) + {s.max_new_tokens} new tokens exceed the model's "
                f"{c.max_position_embeddings} positions"
            )
        if s.strategy != "early_exit":
            return ExitPolicy()
        if s.exit_thresholds and set(s.exit_thresholds) - set(self.exits):
            raise ValueError(f"exit_thresholds: {sorted(s.exit_thresholds)} are not all exits of this model")
        return ExitPolicy(tuple(allowed), float(s.early_exit_threshold), s.measure, per_exit=s.exit_thresholds)

    # ----- generation loop -----------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: GenerationSettings | None = None) -> list[GenerationResult]:
        """Decode a batch of token-id prompts (each its own length) with one strategy; see `generate`."""
        s = settings or GenerationSettings()
        policy = self.check(s, prompts)
        self._profile = s.profile
        results = [GenerationResult(prompt_tokens=list(p), logprobs=[] if s.return_logprobs else None) for p in prompts]
        if s.max_new_tokens == 0:
            return results
        gen = make_generator(s.seed)
        state = self.new_state(len(prompts), max(len(p) for p in prompts) + s.max_new_tokens + 1)
        counts = [[0, 0] for _ in prompts]  # self-speculative: drafted, accepted
        start = _tick(self.device)
        running = self._accept(self.prefill(state, dict(enumerate(prompts))), results, s, gen)
        while running:
            if s.strategy == "self_speculative":
                running = self.speculate_round(state, running, results, s, counts)
            else:
                out = self.decode_one_token(state, {b: results[b].tokens[-1] for b in running}, policy)
                running = self._accept(out, results, s, gen)
        elapsed = _tick(self.device) - start
        self.finish_results(results, s, elapsed, counts, state.exit_time)
        return results

    def _accept(self, out: StepOutput, results, s: GenerationSettings, gen) -> list[int]:
        """Choose each sequence's next token from the logits its exit produced; returns those still running."""
        seqs = list(out.logits)
        chosen = choose(torch.stack([out.logits[b] for b in seqs]), s.temperature, s.top_k, s.top_p, gen).tolist()
        running = []
        for a, b in enumerate(seqs):
            self.append_token(results[b], chosen[a], out.exit_layer[b], out.confidence[b], out.logits[b])
            if not self.is_stopped(results[b], s):
                running.append(b)
        return sorted(running)

    # ----- per-sequence bookkeeping (public: the server's schedulers and the pipeline engine use it) --

    def append_token(self, r: GenerationResult, tok: int, layer: int, conf: float, logits: torch.Tensor | None) -> None:
        """Record one generated token in `r`: the token, the exit it left at, its confidence, and
        (when `r` collects log-probabilities) its log-probability under `logits` [V]."""
        r.tokens.append(int(tok))
        r.exit_layers.append(int(layer))
        r.confidences.append(float(conf))
        if r.logprobs is not None:
            r.logprobs.append(float(torch.log_softmax(logits.float(), -1)[tok]))

    def is_stopped(self, r: GenerationResult, s: GenerationSettings) -> bool:
        """Whether `r` is done after its newest token (EOS unless `ignore_eos`, a stop token, a stop
        string, or `max_new_tokens`); sets its finish_reason and stopped_by when it is."""
        tok = r.tokens[-1]
        eos = self.tokenizer.eod if self.tokenizer is not None and not s.ignore_eos else None
        if tok in s.stop_token_ids or tok == eos:
            r.finish_reason, r.stopped_by = "stop", tok
            return True
        if s.stop_strings and self.tokenizer is not None:
            text = self.tokenizer.detokenize(r.tokens)
            for stop in s.stop_strings:
                if stop in text:
                    r.finish_reason, r.stopped_by = "stop", stop
                    return True
        if len(r.tokens) >= s.max_new_tokens:
            r.finish_reason = "length"
            return True
        return False

    def speculate_round(
        self,
        state: DecodeState,
        running: list[int],
        results: Sequence[GenerationResult] | Mapping[int, GenerationResult],
        s: GenerationSettings,
        counts: Sequence[list[int]] | Mapping[int, list[int]],
    ) -> list[int]:
        """One draft-and-verify round for every running sequence (greedy, lossless); `results[b]`
        and `counts[b]` ([drafted, accepted], updated) belong to slot b. Returns the slots still running.

        Draft: feed the last token, take the draft exit's greedy token, repeat (up to k, and
        never past a sequence's max_new_tokens); the drafts stop at the draft exit, so their
        states are pending there. Verify: one pass feeds the last draft whole and runs every
        drafted row through the deeper layers (filling their K/V), giving the final head's
        token after each row. Keep the longest prefix where it agrees, plus its own token
        (a correction, or a bonus when everything agreed); roll the caches back past it.
        """
        draft_layer = s.draft_exit_layer if s.draft_exit_layer is not None else max(self.draft_exits())
        policy = ExitPolicy(force=draft_layer)
        start = {b: state.fed[b] for b in running}  # position of the first token fed this round
        budget = {b: min(s.num_draft_tokens, s.max_new_tokens - len(results[b].tokens)) for b in running}
        last = {b: results[b].tokens[-1] for b in running}
        drafts: dict[int, list[int]] = {b: [] for b in running}
        draft_conf: dict[int, list[float]] = {b: [] for b in running}
        for j in range(max(budget.values())):
            out = self.decode_one_token(state, {b: last[b] for b in running if budget[b] > j}, policy)
            for b, logits in out.logits.items():
                last[b] = int(logits.argmax())
                drafts[b].append(last[b])
                draft_conf[b].append(out.confidence[b])
        out = self.verify(state, {b: [last[b]] for b in running})
        still = []
        for b in running:
            final = out.all_logits[b].argmax(-1).tolist()  # the final head's token after each fed row
            k, ok = budget[b], 0
            while ok < k and final[ok] == drafts[b][ok]:
                ok += 1
            counts[b][0] += k
            counts[b][1] += ok
            r = results[b]
            for j in range(ok + 1):
                layer, conf = (draft_layer, draft_conf[b][j]) if j < ok else (self.num_layers, out.confidence[b])
                if j == ok and ok < k:  # the correction: the final head's own distribution at that row
                    conf = float(torch.softmax(out.all_logits[b][j], -1).max())
                self.append_token(r, final[j], layer, conf, out.all_logits[b][j])
                if self.is_stopped(r, s):
                    break
            valid = start[b] + ok + 1  # K/V of the fed rows whose tokens were kept
            state.cache.truncate(b, valid)
            if state.exit_cache is not None:
                state.exit_cache.truncate(b, valid)
            state.fed[b] = valid
            if r.finish_reason != "stop" and len(r.tokens) < s.max_new_tokens:
                still.append(b)
        return still

    def finish_results(
        self,
        results: list[GenerationResult],
        s: GenerationSettings,
        elapsed: float,
        counts: list[list[int]],
        exit_time: float,
    ) -> None:
        """Fill in each result's text and stats once decoding is over. `elapsed`: seconds the
        batch took (tokens_per_sec counts every result's tokens over it); counts[b]: [drafted,
        accepted] for self_speculative; exit_time: seconds spent in exits (with `profile`)."""
        total = sum(len(r.tokens) for r in results)
        for b, r in enumerate(results):
            r.text = self.result_text(r) if self.tokenizer is not None else None
            layers = r.exit_layers
            r.stats = {
                "strategy": s.strategy,
                "tokens_per_sec": total / max(elapsed, 1e-9),  # the batch's tokens over the call (prefill included)
                "elapsed_s": elapsed,
                "average_exit_layer": sum(layers) / len(layers) if layers else None,
                "exit_share": {n: layers.count(n) / len(layers) for n in sorted(set(layers))},
                "early_exit_share": sum(x < self.num_layers for x in layers) / len(layers) if layers else 0.0,
            }
            if s.strategy == "self_speculative":
                drafted, accepted = counts[b]
                r.stats.update(drafted=drafted, accepted=accepted, acceptance_rate=accepted / max(drafted, 1))
            if s.profile:
                r.stats["exit_time_share"] = exit_time / max(elapsed, 1e-9)

    def result_text(self, r: GenerationResult) -> str:
        """The text of `r`'s tokens so far (needs a tokenizer): without a final stop token and cut
        before a stop string."""
        toks = r.tokens[:-1] if isinstance(r.stopped_by, int) else r.tokens
        # Decode with the prompt so that word boundaries (e.g. SentencePiece's) come out right.
        head = self.tokenizer.detokenize(r.prompt_tokens)
        both = self.tokenizer.detokenize(r.prompt_tokens + toks)
        text = both[len(head) :] if both.startswith(head) else self.tokenizer.detokenize(toks)
        if isinstance(r.stopped_by, str) and r.stopped_by in text:
            text = text[: text.index(r.stopped_by)]
        return text

    _profile = False


def _check_values(s: GenerationSettings) -> None:
    if s.strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {s.strategy!r}")
    if s.measure not in conf_measures.MEASURES:
        raise ValueError(f"measure must be one of {', '.join(conf_measures.MEASURES)}, got {s.measure!r}")
    if not 0.0 <= s.early_exit_threshold <= 1.0:
        raise ValueError(f"early_exit_threshold must be in [0, 1], got {s.early_exit_threshold}")
    if s.exit_thresholds and not all(0.0 <= t <= 1.0 for t in s.exit_thresholds.values()):
        raise ValueError(f"exit_thresholds must be in [0, 1], got {s.exit_thresholds}")
    if s.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {s.max_new_tokens}")
    if s.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {s.temperature}")
    if s.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {s.top_k}")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}")
    if s.num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {s.num_draft_tokens}")
    if any(not isinstance(x, str) or not x for x in s.stop_strings):
        raise ValueError("stop_strings must be non-empty strings")


def local_kv_groups(model) -> int:
    """K/V heads this model's attention holds: every query group, or this rank's share when
    tensor parallelism sharded the QKV projection (found the way `split_qkv` finds it)."""
    attn = model.decoder.layers[str(model.layer_ids[0])].self_attention
    rows_per_group = (attn.num_heads // attn.num_groups + 2) * attn.head_dim
    return attn.linear_qkv.weight.shape[0] // rows_per_group


def _tick(device: torch.device) -> float:
    """A wall-clock reading after the device has finished its queued work."""
    if device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize(device)
    return time.perf_counter()


def summarize(results: list[GenerationResult], num_layers: int) -> dict:
    """Batch-level telemetry: tokens, tokens/s, average exit layer, share of tokens per exit,
    share that left early, and for self_speculative the acceptance rate."""
    layers = [x for r in results for x in r.exit_layers]
    total = len(layers)
    out = {
        "tokens": total,
        "tokens_per_sec": results[0].stats.get("tokens_per_sec") if results else None,
        "average_exit_layer": sum(layers) / total if total else None,
        "exit_share": {n: layers.count(n) / total for n in sorted(set(layers))},
        "early_exit_share": sum(x < num_layers for x in layers) / total if total else 0.0,
    }
    drafted = sum(r.stats.get("drafted", 0) for r in results)
    if drafted:
        out["acceptance_rate"] = sum(r.stats.get("accepted", 0) for r in results) / drafted
    if results and "exit_time_share" in results[0].stats:
        out["exit_time_share"] = results[0].stats["exit_time_share"]
    return out
