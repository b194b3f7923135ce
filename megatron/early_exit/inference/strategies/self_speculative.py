"""`self_speculative`: greedy and lossless. Draft up to k tokens from an exit, verify them with
one pass of the deeper layers (which reuse the drafts' pending states), keep the longest
agreeing prefix plus the final head's own token, and roll the caches back past it."""

import torch

from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.inference.strategies.base import Batch, Strategy


class SelfSpeculative(Strategy):
    name = "self_speculative"
    shares_passes = False
    drafts = True

    def policy(self, engine, s, allowed: list[int]) -> ExitPolicy:
        if s.temperature > 0:
            raise ValueError("self_speculative decoding is greedy only: use temperature 0")
        if not engine.exits:
            raise ValueError("self_speculative needs a model with exits")
        drafts = engine.draft_exits()
        if not drafts:
            raise ValueError("self_speculative needs an exit below the last layer to draft from")
        if s.draft_exit_layer is not None and s.draft_exit_layer not in drafts:
            raise ValueError(
                f"draft_exit_layer: {s.draft_exit_layer} is not an exit below the last layer (choose from {drafts})"
            )
        return ExitPolicy(force=s.draft_exit_layer if s.draft_exit_layer is not None else max(drafts))

    def round(self, engine, state, running: list[int], batch: Batch) -> list[int]:
        """Draft (feed the last token, take the draft exit's greedy token, up to k and never past
        max_new_tokens), verify (feed the last draft, every drafted row through the deeper
        layers), keep the agreeing prefix."""
        s, results = batch.settings, batch.results
        start = {b: state.fed[b] for b in running}  # position of the first token fed this round
        budget = {b: min(s.num_draft_tokens, s.max_new_tokens - len(results[b].tokens)) for b in running}
        last = {b: results[b].tokens[-1] for b in running}
        drafts: dict[int, list[int]] = {b: [] for b in running}
        confs: dict[int, list[float]] = {b: [] for b in running}
        for j in range(max(budget.values())):
            out = engine.decode_one_token(state, {b: last[b] for b in running if budget[b] > j}, batch.policy)
            for b, logits in out.logits.items():
                last[b] = int(logits.argmax())
                drafts[b].append(last[b])
                confs[b].append(out.confidence[b])
        out = engine.verify(state, {b: [last[b]] for b in running})
        still = []
        for b in running:
            ok = self.keep(engine, out, b, drafts[b], confs[b], batch)
            state.reset(b, start[b] + ok + 1)  # K/V of the fed rows whose tokens were kept
            r = results[b]
            if r.finish_reason != "stop" and len(r.tokens) < s.max_new_tokens:
                still.append(b)
        return still

    def keep(self, engine, out, b: int, drafts: list[int], confs: list[float], batch: Batch) -> int:
        """Append slot b's agreeing drafts and the final head's token; returns how many drafts agreed."""
        final = out.all_logits[b].argmax(-1).tolist()  # the final head's token after each fed row
        k, ok = len(drafts), 0
        while ok < k and final[ok] == drafts[ok]:
            ok += 1
        batch.counts[b][0] += k
        batch.counts[b][1] += ok
        r, acc, layer = batch.results[b], engine.acceptance, batch.policy.force
        for j in range(ok + 1):
            exit_layer, conf = (layer, confs[j]) if j < ok else (engine.num_layers, out.confidence[b])
            if j == ok and ok < k:  # the correction: the final head's own distribution at that row
                conf = float(torch.softmax(out.all_logits[b][j], -1).max())
            acc.append(r, final[j], exit_layer, conf, out.all_logits[b][j])
            if acc.stopped(r, batch.settings):
                break
        return ok
