"""Batched early-exit generation that keeps the KV cache exact (DESIGN.md section 6).

One *pass* pushes, for every sequence in the batch, the rows that lack K/V at each layer
through that layer: at layer i the rows of sequence b are its positions
[filled[i, b], end_b), i.e. the states of earlier tokens that exited before layer i
(remembered at their exit depth, "pending") followed by the rows carried up from
layer i-1 (which always end with the newest token). This is EE-LLM's KV recomputation:
the deeper layers' missing K/V are computed exactly as the full model would have, the
next time a token of that sequence goes deeper, in the same batched pass.

Strategies:
- full: no exit fires; one row per sequence per step (plus the prompt at prefill).
- early_exit: after each allowed exit, the newest token of each running sequence exits
  when its confidence reaches the threshold (per sequence: the others go on deeper).
- self_speculative: draft up to k tokens from one exit, verify them with one pass of the
  deeper layers over the drafted rows (which fills their K/V), keep the longest prefix the
  final head agrees with plus its correction, and roll the caches back past it. Greedy
  output equals full greedy output.

Shape legend: A sequences in a pass, R rows per sequence (padded), h hidden, V vocabulary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron.early_exit.inference.kv_cache import KVCache
from megatron.early_exit.inference.sampling import MEASURES, choose, confidence

STRATEGIES = ("full", "early_exit", "self_speculative")


@dataclass
class GenerationSettings:
    strategy: str = "full"
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    early_exit_threshold: float = 0.8
    exit_layers: tuple[int, ...] | None = None  # which exits may fire (default: all)
    min_exit_layer: int | None = None
    measure: str = "max_prob"
    num_draft_tokens: int = 4
    draft_exit_layer: int | None = None  # default: the deepest exit
    return_logprobs: bool = False


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)
    exit_layers: list[int] = field(default_factory=list)  # num_layers = the final head
    confidences: list[float] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str | None = None
    finish_reason: str = "length"
    stats: dict = field(default_factory=dict)


@dataclass
class _PassOutput:
    token_logits: dict[int, torch.Tensor]  # seq -> [V] logits that chose the newest token
    exit_layer: dict[int, int]
    confidence: dict[int, float]
    verify_logits: dict[int, torch.Tensor]  # seq -> [R, V] final logits of all rows (verify passes)


class EarlyExitEngine:
    def __init__(self, model, tokenizer=None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = model.config
        self.num_layers = self.config.num_layers
        self.real_vocab = self.config.real_vocab_size or self.config.vocab_size
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    # ----- validation ----------------------------------------------------------------------

    def _check(self, s: GenerationSettings) -> list[int]:
        if s.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {s.strategy!r}")
        if s.measure not in MEASURES:
            raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {s.measure!r}")
        if not 0.0 <= s.early_exit_threshold <= 1.0:
            raise ValueError(f"early_exit_threshold must be in [0, 1], got {s.early_exit_threshold}")
        if s.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        exits = list(self.config.exit_layer_nums)
        allowed = list(s.exit_layers) if s.exit_layers is not None else exits
        unknown = [n for n in allowed if n not in exits]
        if unknown:
            raise ValueError(f"exit_layers {unknown} are not exits of this model (it has {exits or 'none'})")
        if s.min_exit_layer is not None:
            allowed = [n for n in allowed if n >= s.min_exit_layer]
        if s.strategy != "full" and self.config.use_exit_block:
            raise ValueError("early-exit decoding does not support exits with a transformer block (--use-exit-block)")
        if s.measure == "learned" and s.strategy == "early_exit":
            missing = [n for n in allowed if self.model.exits[str(n)].confidence is None]
            if missing:
                raise ValueError(f"measure 'learned' needs confidence heads; exits {missing} have none")
        if s.strategy == "self_speculative":
            if s.temperature > 0:
                raise ValueError("self_speculative decoding is greedy only (temperature 0)")
            if not exits:
                raise ValueError("self_speculative needs a model with exits")
            draft = s.draft_exit_layer if s.draft_exit_layer is not None else max(exits)
            if draft not in exits:
                raise ValueError(f"draft_exit_layer {draft} is not an exit of this model (it has {exits})")
            if s.num_draft_tokens < 1:
                raise ValueError("num_draft_tokens must be >= 1")
        return allowed if s.strategy == "early_exit" else []

    # ----- one pass through the layers -----------------------------------------------------

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Drop the padded vocabulary rows: they are never tokens."""
        return logits[..., : self.real_vocab].float()

    @torch.no_grad()
    def _pass(self, seqs, new_tokens, st, allowed, threshold, measure, force_exit=None, verify=False) -> _PassOutput:
        """Run every sequence in `seqs` from its new tokens (and pending rows) as deep as it goes."""
        model, cache, out = self.model, st["cache"], _PassOutput({}, {}, {}, {})
        end = {b: st["fed"][b] + len(new_tokens.get(b, [])) for b in seqs}
        carried: dict[int, torch.Tensor] = {}
        for b in seqs:  # layer-0 rows: the new tokens' embeddings
            toks = new_tokens.get(b, [])
            if toks:
                ids = torch.tensor([toks], device=self.device)
                pos = torch.arange(st["fed"][b], end[b], device=self.device)[None]
                carried[b] = model.embedding(ids, pos)[0]
            st["fed"][b] = end[b]
        active = list(seqs)
        carried_from = {b: st["fed"][b] - len(new_tokens.get(b, [])) for b in carried}  # first carried position
        for i in range(self.num_layers):
            rows = {}
            for b in active:
                # Rows lacking K/V at layer i: pending states that exited after exactly i layers
                # (positions filled[i] .. the first carried one), then the carried rows.
                lo = int(cache.filled[i, b])
                hi = carried_from.get(b, int(cache.filled[i - 1, b]) if i > 0 else lo)
                parts = [st["pending"][b][lo:hi]] if hi > lo else []
                if b in carried:
                    parts.append(carried[b])
                if parts:
                    rows[b] = (lo, torch.cat(parts))
            if not rows:
                carried, carried_from = {}, {}
                continue
            carried = self._run_layer(i, rows, cache)
            carried_from = {b: lo for b, (lo, _) in rows.items()}
            for b, (lo, _) in rows.items():
                cache.filled[i, b] = lo + carried[b].shape[0]
            n = i + 1
            if force_exit == n or (n in allowed):
                fired = self._exit_check(n, carried, active, threshold, measure, force_exit == n, out)
                for b in fired:
                    lo = int(cache.filled[i, b]) - carried[b].shape[0]
                    st["pending"][b][lo : cache.filled[i, b]] = carried[b].to(st["pending"][b].dtype)
                active = [b for b in active if b not in fired]
                carried = {b: h for b, h in carried.items() if b not in fired}
                carried_from = {b: v for b, v in carried_from.items() if b not in fired}
        self._final_head(carried, verify, out)
        return out

    def _run_layer(self, i: int, rows: dict[int, tuple[int, torch.Tensor]], cache: KVCache) -> dict[int, torch.Tensor]:
        seqs = list(rows)
        r_max = max(h.shape[0] for _, h in rows.values())
        hidden = rows[seqs[0]][1]
        x = hidden.new_zeros(len(seqs), r_max, hidden.shape[-1])  # (A, R, h)
        pos = torch.zeros(len(seqs), r_max, dtype=torch.long, device=self.device)
        valid = torch.zeros(len(seqs), r_max, dtype=torch.bool, device=self.device)
        for a, b in enumerate(seqs):
            lo, h = rows[b]
            x[a, : h.shape[0]] = h
            pos[a, : h.shape[0]] = torch.arange(lo, lo + h.shape[0], device=self.device)
            valid[a, : h.shape[0]] = True
        batch_idx = torch.tensor(seqs, device=self.device)
        view = cache.layer(i, batch_idx, pos, valid)
        keys = torch.arange(view.span, device=self.device)
        mask = (keys[None, None, :] <= pos[:, :, None]) & valid[:, :, None]  # (A, R, t)
        mask[:, :, 0] |= ~valid  # padding rows attend to one slot: no all-masked softmax
        rotary = self.model.rotary(pos) if self.model.rotary is not None else None
        y = self.model.decoder.layers[str(i)](x, rotary, mask[:, None], view)
        return {b: y[a, : rows[b][1].shape[0]] for a, b in enumerate(seqs)}

    def _exit_check(self, n, carried, active, threshold, measure, forced, out) -> set[int]:
        """Exit n's decision for the newest token of each active sequence; returns who exits."""
        cand = [b for b in active if b in carried]
        if not cand:
            return set()
        head = self.model.exits[str(n)]
        last = torch.stack([carried[b][-1] for b in cand])[:, None]  # (A, 1, h)
        hidden = head.hidden(last)
        if forced or threshold <= 0.0:
            conf = torch.ones(len(cand))
            fire = torch.ones(len(cand), dtype=torch.bool)
        elif threshold >= 1.0 and measure != "learned":
            return set()  # never exits early: skip the vocabulary projection entirely
        elif measure == "learned":
            conf = torch.sigmoid(head.confidence_logit(hidden)[:, 0].float()).cpu()
            fire = conf >= threshold
        else:
            conf = None
        if conf is not None and not bool(fire.any()):
            return set()
        logits = self._vocab(head.project(hidden, self.model.tied_output_weight())[:, 0])  # (A, V)
        if conf is None:
            conf = confidence(logits, measure).cpu()
            fire = conf >= threshold
        fired = set()
        for a, b in enumerate(cand):
            if bool(fire[a]):
                fired.add(b)
                out.token_logits[b], out.exit_layer[b], out.confidence[b] = logits[a], n, float(conf[a])
        return fired

    def _final_head(self, carried, verify, out) -> None:
        if not carried:
            return
        seqs = list(carried)
        m = self.model
        if verify:
            for b in seqs:
                logits = self._vocab(m.head_ops.project(m.decoder.final_layernorm(carried[b]), m.output_weight()))
                out.verify_logits[b] = logits
                out.token_logits[b], out.exit_layer[b], out.confidence[b] = logits[-1], self.num_layers, 1.0
            return
        last = torch.stack([carried[b][-1] for b in seqs])
        logits = self._vocab(m.head_ops.project(m.decoder.final_layernorm(last), m.output_weight()))
        probs = torch.softmax(logits, -1).max(-1).values.cpu()
        for a, b in enumerate(seqs):
            out.token_logits[b], out.exit_layer[b], out.confidence[b] = logits[a], self.num_layers, float(probs[a])

    # ----- generation loop -----------------------------------------------------------------

    def _new_state(self, prompts, s) -> dict:
        c = self.config
        capacity = max(len(p) for p in prompts) + s.max_new_tokens + s.num_draft_tokens + 1
        if (
            c.position_embedding_type == "learned_absolute"
            and capacity - s.num_draft_tokens - 1 > c.max_position_embeddings
        ):
            raise ValueError(
                f"prompt + max_new_tokens = {capacity - s.num_draft_tokens - 1} exceeds the model's "
                f"{c.max_position_embeddings} positions"
            )
        cache = KVCache(
            self.num_layers, len(prompts), capacity, int(c.num_query_groups), c.head_dim, self.dtype, self.device
        )
        pending = [torch.zeros(capacity + 1, c.hidden_size, dtype=self.dtype, device=self.device) for _ in prompts]
        return {"cache": cache, "pending": pending, "fed": [0] * len(prompts)}

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: GenerationSettings | None = None) -> list[GenerationResult]:
        """Decode a batch of token-id prompts (each its own length) with one strategy."""
        s = settings or GenerationSettings()
        allowed = self._check(s)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        gen = torch.Generator().manual_seed(s.seed) if s.seed is not None else None
        results = [GenerationResult(prompt_tokens=list(p)) for p in prompts]
        if s.max_new_tokens == 0:
            return results
        st = self._new_state(prompts, s)
        start = time.perf_counter()
        # Prefill: the whole prompt through every layer (no exits), which also gives token 1.
        out = self._pass(list(range(len(prompts))), {b: list(p) for b, p in enumerate(prompts)}, st, [], 1.0, s.measure)
        running = self._accept(out, list(range(len(prompts))), results, s, gen)
        stats = {"passes": 1, "drafted": 0, "accepted": 0}
        while running:
            if s.strategy == "self_speculative":
                running = self._speculate(running, st, results, s, stats)
            else:
                feed = {b: [results[b].tokens[-1]] for b in running}
                out = self._pass(running, feed, st, allowed, s.early_exit_threshold, s.measure)
                running = self._accept(out, running, results, s, gen)
            stats["passes"] += 1
        self._finish(results, s, time.perf_counter() - start, stats)
        return results

    def _accept(self, out: _PassOutput, seqs, results, s, gen) -> list[int]:
        """Choose each sequence's next token from the logits its exit produced; returns the still running."""
        chosen = choose(torch.stack([out.token_logits[b] for b in seqs]), s.temperature, s.top_k, s.top_p, gen)
        running = []
        for a, b in enumerate(seqs):
            tok = int(chosen[a])
            self._append(results[b], tok, out.exit_layer[b], out.confidence[b], out.token_logits[b], s)
            if not self._stopped(results[b], s):
                running.append(b)
        return running

    def _append(self, r: GenerationResult, tok, layer, conf, logits, s) -> None:
        r.tokens.append(tok)
        r.exit_layers.append(int(layer))
        r.confidences.append(float(conf))
        if s.return_logprobs and logits is not None:
            r.logprobs.append(float(torch.log_softmax(logits.float(), -1)[tok]))

    def _stopped(self, r: GenerationResult, s) -> bool:
        tok = r.tokens[-1]
        eod = self.tokenizer.eod if self.tokenizer is not None else None
        if tok in s.stop_token_ids or (eod is not None and tok == eod):
            r.finish_reason = "stop"
            return True
        if s.stop_strings and self.tokenizer is not None:
            text = self.tokenizer.detokenize(r.tokens)
            for stop in s.stop_strings:
                if stop in text:
                    r.finish_reason = "stop"
                    return True
        if len(r.tokens) >= s.max_new_tokens:
            r.finish_reason = "length"
            return True
        return False

    def _speculate(self, running, st, results, s, stats) -> list[int]:
        """One draft-and-verify round for every running sequence."""
        cache = st["cache"]
        draft_layer = s.draft_exit_layer if s.draft_exit_layer is not None else max(self.config.exit_layer_nums)
        start = {b: st["fed"][b] for b in running}  # position of the token fed first
        drafts: dict[int, list[int]] = {b: [] for b in running}
        last = {b: results[b].tokens[-1] for b in running}
        k = min(s.num_draft_tokens, max(s.max_new_tokens - len(results[b].tokens) for b in running))
        for _ in range(k):  # drafts: through the layers up to the draft exit only
            out = self._pass(running, {b: [last[b]] for b in running}, st, [], 0.0, s.measure, force_exit=draft_layer)
            for b in running:
                last[b] = int(out.token_logits[b].argmax())
                drafts[b].append(last[b])
        out = self._pass(running, {}, st, [], 1.0, s.measure, verify=True)  # the deeper layers, all drafted rows
        still = []
        for b in running:
            final = out.verify_logits[b].argmax(-1).tolist()  # final head's token after each drafted row
            n_ok = 0
            while n_ok < k and final[n_ok] == drafts[b][n_ok]:
                n_ok += 1
            new = drafts[b][:n_ok] + ([final[n_ok]] if n_ok < k else [])
            stats["drafted"] += k
            stats["accepted"] += n_ok
            r = results[b]
            for j, tok in enumerate(new):
                exit_layer = draft_layer if j < n_ok else self.num_layers
                self._append(r, tok, exit_layer, 1.0, out.verify_logits[b][j], s)
                if self._stopped(r, s):
                    break
            # K/V stay valid for the rows whose input token was accepted; the rest roll back.
            valid_until = start[b] + n_ok + 1 if n_ok < k else start[b] + k
            cache.truncate(b, valid_until)
            st["fed"][b] = valid_until
            if r.finish_reason == "stop" or len(r.tokens) >= s.max_new_tokens:
                r.finish_reason = r.finish_reason if r.finish_reason == "stop" else "length"
                continue
            still.append(b)
        return still

    def _finish(self, results, s, elapsed, stats) -> None:
        total = sum(len(r.tokens) for r in results)
        for r in results:
            if self.tokenizer is not None:
                # Decode with the prompt so that word boundaries (e.g. SentencePiece's) come out right.
                head = self.tokenizer.detokenize(r.prompt_tokens)
                both = self.tokenizer.detokenize(r.prompt_tokens + r.tokens)
                r.text = both[len(head) :] if both.startswith(head) else self.tokenizer.detokenize(r.tokens)
            layers = r.exit_layers
            r.stats = {
                "tokens_per_sec": total / max(elapsed, 1e-9),
                "elapsed_s": elapsed,
                "average_exit_layer": sum(layers) / len(layers) if layers else None,
                "exit_share": {str(n): layers.count(n) / len(layers) for n in sorted(set(layers))} if layers else {},
                "strategy": s.strategy,
            }
            if s.strategy == "self_speculative":
                r.stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
