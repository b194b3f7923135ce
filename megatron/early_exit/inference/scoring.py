"""Prompt scoring under early exit: each prompt row's logits from the exit a generated token would take.

A server request that scores its prompt (echo with logprobs, lm-eval's loglikelihood) asks
for log P(token t | tokens < t) at every prompt position. Under early exit, the token that
decoding would generate after position t - 1 comes from the shallowest allowed exit whose
confidence at row t - 1 reaches its threshold (the `exact` rule), else from the final head.
KV recomputation (passes.py) makes a decoded row's hidden state at every depth the full
model's on the same prefix, so one prefill of the whole prompt through every layer sees the
same states: `score` runs it (the KV cache filled as by any prefill) and, at each exit's
depth, evaluates the exit on every new row. Confidences and logits can differ from a decode
step's by round-off only (a row batched with others instead of alone).

The `cost_aware` rule decides per pass from the batch's costs, not per row, so it has no
per-row answer here; scoring uses `exact` (the server refuses an explicit `cost_aware`).

Shape legend: N new rows of the pass (all sequences), R rows of one sequence, h hidden,
V vocabulary (real, unpadded).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from megatron.early_exit.inference.confidence import get_measure
from megatron.early_exit.inference.passes import DecodeState, ExitPolicy, Rows, StepOutput


@dataclass
class RowScores:
    """What `Passes.run` collects for `score` at each exit's depth: per sequence b, the layer
    each of its new rows leaves at (`num_layers`: none fired) and that exit's logits there."""

    policy: ExitPolicy
    new: dict[int, int]  # b -> how many new rows it has (its last rows at every depth)
    num_layers: int
    by_depth: dict[int, list[int]] = field(default_factory=dict)  # depth -> exits evaluated there
    layer: dict[int, torch.Tensor] = field(default_factory=dict)  # b -> [R] exit layer per new row
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # b -> [R, V] exit logits (where fired)

    def at_depth(self, passes, state: DecodeState, d: int, rows: Rows) -> None:
        for n in self.by_depth.get(d, []):
            self.check(passes, state, n, rows)

    def check(self, passes, state: DecodeState, n: int, rows: Rows) -> None:
        """Exit n on every new row of `rows`; rows that no shallower exit took and whose
        confidence reaches n's threshold leave here."""
        seqs = [b for b in rows.seqs if b in self.new]
        backbone = torch.cat([_new_rows(rows, b, self.new[b]) for b in seqs])[:, None]  # (N, 1, h)
        head = passes.model.exits[str(n)]
        if head.block is not None:
            h, cnt = passes.block_catch_up(state, n, head, seqs)  # (A, R, h)
            hidden = torch.cat([h[a, cnt[a] - self.new[b] : cnt[a]] for a, b in enumerate(seqs)])[:, None]
        else:
            hidden = head.hidden(backbone)  # (N, 1, h)
        logits = passes.exit_logits(head, hidden)  # (N, V)
        measure = get_measure(self.policy.measure)
        if measure.needs_vocab:
            conf = measure.from_logits(logits)
        elif measure.from_backbone is not None and head.probe_reads_backbone:
            conf = measure.from_backbone(head, backbone)
        else:
            conf = measure.from_hidden(head, hidden)
        fire = conf >= self.policy.threshold_of(n)  # (N,)
        start = 0
        for b in seqs:
            k = self.new[b]
            if b not in self.layer:
                self.layer[b] = torch.full((k,), self.num_layers, dtype=torch.long, device=fire.device)
                self.logits[b] = logits.new_zeros(k, logits.shape[-1])
            leave = fire[start : start + k] & (self.layer[b] == self.num_layers)
            self.layer[b][leave] = n
            self.logits[b][leave] = logits[start : start + k][leave]
            start += k

    def apply(self, out: StepOutput) -> None:
        """Replace the final head's logits of the rows that left early; each row's layer in `row_exit_layer`."""
        for b, k in self.new.items():
            final = out.all_logits[b][-k:]  # (R, V)
            if b in self.layer:
                left = self.layer[b] < self.num_layers
                final = torch.where(left[:, None], self.logits[b], final)
                out.row_exit_layer[b] = self.layer[b].tolist()
            else:
                out.row_exit_layer[b] = [self.num_layers] * k
            out.all_logits[b] = final


def _new_rows(rows: Rows, b: int, k: int) -> torch.Tensor:
    """Sequence b's last k rows [k, h] (its new tokens: pending rows come first)."""
    a = rows.seqs.index(b)
    return rows.x[a, rows.n[a] - k : rows.n[a]]


@torch.no_grad()
def score(passes, state: DecodeState, new_tokens: dict[int, list[int]], policy: ExitPolicy) -> StepOutput:
    """Feed `new_tokens` through every layer (a prefill of every row, as `verify`); each new row's
    logits in `all_logits` are those of the exit a token generated there would leave at under
    `policy` with the `exact` rule (the final head's where none fires), that layer per row in
    `row_exit_layer`. `logits` / `exit_layer` of the newest row stay the final head's, as after
    a prefill: decoding's first token always comes from all layers."""
    exact = replace(policy, mode="exact")
    scores = RowScores(exact, {b: len(t) for b, t in new_tokens.items() if t}, passes.num_layers)
    scores.by_depth = {d: [n for n in ns if n != exact.force] for d, ns in passes.exits_by_depth(exact).items()}
    out = passes.run(state, new_tokens, ExitPolicy(), all_rows=True, scores=scores)
    scores.apply(out)
    return out
