"""EE-Tuning from cached activations (`--tune-exit --exit-activation-cache DIR`).

The backbone is frozen, so what it feeds the exits never changes: `tools/checkpoint/
cache_exit_activations.py` stores each exit's input and the final head's top-k once
(`exit_cache.py`), and this trainer runs only the exit heads, for as many epochs as asked.
Objectives match `losses.tuning_losses`:

- `ce`: cross-entropy of the exit with the labels;
- `kd`: T^2 * sum_{i in top-k} q_i (log q_i - log p_i), where q is the teacher's cached top-k
  **renormalised over the top-k** (softmax of log-prob / T over those k tokens) and p is the
  exit's softmax(logits / T) over the whole vocabulary (or its candidate-set estimate). With
  k = vocabulary size this is exactly the full-vocabulary distillation of `tuning_losses`;
- `ce+kd`: both; confidence probes learn "the exit's top token equals the cached final top-1".

`--exit-candidate-vocab N` replaces the vocabulary by one candidate set per micro-batch
(sampled softmax, Jean et al. 2015), scored by every token of it with one product
`h @ W[C]^T` -> [tokens, |C|]: C is P, the distinct labels and cached top-k ids of all the
micro-batch's tokens, then m = min(N, V - |P|) negatives drawn uniformly without replacement
from the V - |P| ids outside P. CE and KD read their columns by position (an id -> column map
built once per micro-batch); no id is a column twice, so no per-token masking is needed.
The correction: given the micro-batch, every id of P is a column with probability 1 (a
token's own label and top-k, and the other tokens' ones alike), so its logit keeps log 1 = 0:
the other tokens' positives are exact terms of the token's partition function, not samples.
An id outside P is a column with probability m / (V - |P|), so a negative's logit gets
-log(m / (V - |P|)) (added after any temperature). Then sum_C exp(z + correction) is an
unbiased estimate of the full sum_V exp(z) for every token. With m = V - |P| the columns are
the vocabulary exactly once and the loss is the full one. The agreement a probe learns is
"the cached top-1 has the exit's largest logit over C" (uncorrected logits; a tie counts as
agreement). A micro-batch of 4 x 256 SmolLM2 tokens with top-16 has |P| ~ 2,400-3,000, so with
N = 2048 a token scores ~5,000 columns (the per-token sets it replaced: 17 + 2048). Validation
always projects onto the whole vocabulary.

Epoch 0 reads the cache in stored order (megatron-core's dataset order: the same first
batches as tuning through the backbone), later epochs a permutation seeded by (seed, epoch).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from megatron.early_exit import checkpointing as ckpt
from megatron.early_exit.derived import DerivedCopies
from megatron.early_exit.training import exit_cache
from megatron.early_exit.training.losses import masked_mean
from megatron.early_exit.training.trainer import Trainer


def validate_cache_args(args: argparse.Namespace) -> None:
    """The cached-tuning flags (called from arguments.validate_args)."""
    if args.exit_candidate_vocab and not args.exit_activation_cache:
        raise ValueError("--exit-candidate-vocab needs --exit-activation-cache DIR")
    if not args.exit_activation_cache:
        return
    if not args.tune_exit:
        raise ValueError("--exit-activation-cache needs --tune-exit")
    if args.data_path or args.mock_data:
        raise ValueError("--exit-activation-cache replaces --data-path/--mock-data: give only the cache")
    if args.exit_candidate_vocab is not None and args.exit_candidate_vocab < 1:
        raise ValueError(f"--exit-candidate-vocab must be >= 1, got {args.exit_candidate_vocab}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.tensor_model_parallel_size > 1:
        raise ValueError("--exit-activation-cache runs in one process (no torchrun, no tensor parallelism)")
    if args.tune_exit_pipeline_parallel_size not in (None, 1) or args.pipeline_model_parallel_size > 1:
        raise ValueError("--exit-activation-cache runs in one process (no pipeline parallelism)")
    if not os.path.isdir(args.exit_activation_cache):
        raise ValueError(f"--exit-activation-cache {args.exit_activation_cache}: no such directory")


# ----- the exit's columns: the whole vocabulary or the micro-batch's candidate set ----------


@dataclass
class Columns:
    """The vocabulary columns a micro-batch's exits score, and where its labels and top-k sit.

    Whole vocabulary (`ids` None): column = token id. Candidate set (`candidate_set`): the
    distinct ids `ids` [C], shared by every token of the micro-batch, with a correction `bias`
    [C] added to the logits (None where none is needed); `label_col` / `topk_col` give each
    token's label and cached top-k as positions in `ids`.
    """

    label_col: torch.Tensor  # [b, s]
    topk_col: torch.Tensor  # [b, s, k]
    ids: torch.Tensor | None = None  # [C] token id of each column: the positives P, then the negatives
    bias: torch.Tensor | None = None  # [C] fp32, 0 on the positives, -log(m / (V - |P|)) on the negatives
    num_positives: int = 0
    _rows: dict = field(default_factory=dict, repr=False)  # frozen weight rows, shared by the exits

    def rows(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The columns' rows of the vocabulary weight [C, h] in `dtype`; gathered once per
        micro-batch for a frozen weight (the tied embedding every exit shares)."""
        if weight.requires_grad:  # trains: the gather stays in the graph
            return weight.index_select(0, self.ids).to(dtype)
        key = (id(weight), weight._version, dtype)
        if key not in self._rows:
            self._rows = {key: _weight_in(weight, dtype).index_select(0, self.ids)}
        return self._rows[key]

    def raw_max(self, z: torch.Tensor) -> torch.Tensor:
        """Max over the columns of the logits without the correction [b, s], from corrected `z`."""
        if self.bias is None:
            return z.amax(-1)
        top_neg = z[..., self.num_positives :].amax(-1) - self.bias[-1]
        return torch.maximum(z[..., : self.num_positives].amax(-1), top_neg)


def whole_vocabulary(batch: dict) -> Columns:
    return Columns(batch["labels"], batch["topk_ids"])


def candidate_set(labels, topk_ids, vocab_size: int, num_negatives: int, generator) -> Columns:
    """The micro-batch's columns: P, the distinct labels and cached top-k ids of all its tokens,
    then m = min(N, V - |P|) negatives drawn uniformly without replacement from the ids outside P
    (`generator`: a CPU torch.Generator). See the module docstring for the correction."""
    device = labels.device
    positives = torch.unique(torch.cat([labels.flatten(), topk_ids.flatten()]))  # sorted, each id once
    free = vocab_size - positives.numel()
    m = min(num_negatives, free)
    outside = torch.ones(vocab_size, dtype=torch.bool)
    outside[positives.cpu()] = False
    order = torch.randperm(vocab_size, generator=generator)
    negatives = order[outside[order]][:m].to(device)
    ids = torch.cat([positives, negatives])
    bias = None
    if 0 < m < free:  # m = V - |P|: every id is a column once, no correction (the full softmax)
        correction = torch.full((m,), -math.log(m / free), device=device)
        bias = torch.cat([torch.zeros(positives.numel(), device=device), correction])
    position = torch.empty(vocab_size, dtype=torch.long, device=device)
    position[ids] = torch.arange(ids.numel(), device=device)
    return Columns(position[labels], position[topk_ids], ids, bias, positives.numel())


# A frozen vocabulary weight in the compute dtype, made once instead of casting the rows
# gathered for every micro-batch (the gather and its cast were a third of a cached step);
# `derived.py` remakes it when the weight changes and drops it with the weight. Never for a
# weight that trains (its gradient must flow through the gather).
_FROZEN_COPIES = DerivedCopies()


def _weight_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if weight.dtype == dtype or weight.requires_grad:
        return weight
    return _FROZEN_COPIES.get(weight, dtype, lambda w: w.to(dtype))


def exit_logits(model, head, hidden, cols: Columns) -> torch.Tensor:
    """The exit's logits over the columns [b, s, C] (the exit's temperature applied, no
    correction), in the products' dtype: one matmul with the columns' rows of the weight."""
    weight = head.output_weight(model.tied_output_weight())
    if cols.ids is None:
        return head.project_onto(hidden, weight)
    kind = hidden.device.type  # the products' dtype: autocast's where it is on
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else hidden.dtype
    return head.project_onto(hidden, cols.rows(weight, dtype))


# ----- the objective -------------------------------------------------------------------


def _kd(raw, cols: Columns, topk_lp, kd_temperature: float, student):
    """T^2 * KL(teacher top-k renormalised || student) on the top-k: [b, s]. `raw`: the exit's
    logits; `student`: its log-probs of the top-k at T = 1 (reused). The correction is added
    after the temperature: it weighs exp(z / T) of a sampled column, not z."""
    if kd_temperature != 1.0:
        z = raw.float() / kd_temperature
        z = z if cols.bias is None else z + cols.bias
        student = torch.log_softmax(z, -1).gather(-1, cols.topk_col)  # (b, s, k)
    teacher = torch.log_softmax(topk_lp / kd_temperature, -1)
    return (teacher.exp() * (teacher - student)).sum(-1) * kd_temperature**2


def cached_agreement(z: torch.Tensor, cols: Columns) -> torch.Tensor:
    """[b, s] 1.0 where the exit's top token is the cached top-1 (its logit, without the
    correction, is the largest over the columns; a tie agrees): what a probe learns. `z`: the
    exit's corrected fp32 logits over the columns."""
    return (z.gather(-1, cols.topk_col[..., :1]).squeeze(-1) >= cols.raw_max(z)).float()


def exit_terms(model, n: int, batch: dict, rotary, loss_type: str, kd_t: float, cols: Columns):
    """One exit's per-token losses and logged parts from its cached input."""
    head = model.exits[str(n)]
    backbone = batch["hidden"][n].float()  # the exit's cached input: the backbone at its depth
    hidden = head.hidden(backbone, rotary)
    raw = exit_logits(model, head, hidden, cols)
    z = raw.float() if cols.bias is None else raw + cols.bias  # fp32 either way (one pass)
    own = torch.cat([cols.label_col.unsqueeze(-1), cols.topk_col], -1)  # (b, s, 1 + k): one gather
    lp, mask = torch.log_softmax(z, -1).gather(-1, own), batch["loss_mask"]
    ce = -lp[..., 0]
    parts = {f"exit_{n} loss": masked_mean(ce, mask).detach()}
    per_token = ce if "ce" in loss_type.split("+") else torch.zeros_like(ce)
    if "kd" in loss_type:
        kd = _kd(raw, cols, batch["topk_logprobs"], kd_t, lp[..., 1:])
        parts[f"exit_{n} kd loss"] = masked_mean(kd, mask).detach()
        per_token = per_token + kd
    with torch.no_grad():
        agree = cached_agreement(z, cols)
    parts[f"exit_{n} agreement"] = masked_mean(agree, mask)
    probe = None
    if head.confidence is not None:
        conf_logit = head.confidence_logit(head.probe_input(backbone, hidden.detach())).float()
        probe = masked_mean(F.binary_cross_entropy_with_logits(conf_logit, agree, reduction="none"), mask)
        parts[f"exit_{n} confidence loss"] = probe.detach()
    return masked_mean(per_token, mask), probe, parts


def probe_terms(model, n: int, batch: dict, rotary, cols: Columns):
    """`--tune-exit-confidence-only`: one exit's probe loss (the BCE of `exit_terms`, against the
    same agreement with the cached top-1) and its logged parts. Nothing of the exit trains, so
    its logits are made without a graph and no loss of its own is made (its log-softmax over
    the vocabulary was most of a cached step's arithmetic)."""
    head = model.exits[str(n)]
    backbone = batch["hidden"][n].float()
    with torch.no_grad():
        hidden = head.hidden(backbone, rotary)
        raw = exit_logits(model, head, hidden, cols)
        z = raw.float() if cols.bias is None else raw + cols.bias
        agree = cached_agreement(z, cols)
    mask = batch["loss_mask"]
    conf_logit = head.confidence_logit(head.probe_input(backbone, hidden)).float()
    probe = masked_mean(F.binary_cross_entropy_with_logits(conf_logit, agree, reduction="none"), mask)
    parts = {f"exit_{n} agreement": masked_mean(agree, mask), f"exit_{n} confidence loss": probe.detach()}
    return probe, parts


def cached_losses(
    model, batch: dict, exit_weights: dict[int, float], loss_type: str, kd_t: float, cols=None,
    probes_only: bool = False,
):  # fmt: skip
    """The tuning objective of every exit from one cached micro-batch: (total, parts).
    `cols`: the micro-batch's candidate set (`candidate_set`), None for the whole vocabulary.
    `probes_only` (`--tune-exit-confidence-only`): the probes' losses alone (`probe_terms`)."""
    cols = whole_vocabulary(batch) if cols is None else cols
    s = batch["labels"].shape[1]
    positions = torch.arange(s, device=batch["labels"].device).unsqueeze(0)
    rotary = model.rotary(positions) if model.rotary is not None else None
    total, parts = None, {}
    for n in model.exit_layer_numbers:
        if probes_only:
            term, p = probe_terms(model, n, batch, rotary, cols)
        else:
            loss, probe, p = exit_terms(model, n, batch, rotary, loss_type, kd_t, cols)
            term = exit_weights[n] * loss + (probe if probe is not None else 0.0)
        total = term if total is None else total + term
        parts.update(p)
    return total, parts


# ----- the trainer ---------------------------------------------------------------------


class CachedTuner(Trainer):
    """`Trainer` for `--tune-exit --exit-activation-cache DIR`: same optimizer, schedule,
    logging and checkpoints; the micro-batches come from the cache and only exits run.
    AdamW is torch's fused kernel (one process, so no layout has to match it): one pass over
    each parameter instead of several. For SmolLM2's three MLP exits alone the optimizer step
    took 8 ms against 41 ms with foreach, within the noise of a ~0.5 s step; it matters where the
    exits own their output projections (3 x 28M more parameters to step)."""

    fused_optimizer = True

    def _tuning_layers(self) -> tuple[int, bool]:
        return max(self.config.exit_layer_nums), False  # the layers are loaded, never run

    def _build_data(self) -> None:
        directory = self.args.exit_activation_cache
        manifest = exit_cache.read_manifest(directory)
        weights = ckpt.read_weights(self.meta.directory)
        fingerprint = exit_cache.backbone_fingerprint(self.config, weights)
        if manifest.get("fingerprint") != fingerprint:  # a cache of the first format carries the older form
            fingerprint = (fingerprint, exit_cache.backbone_fingerprint(self.config, weights, legacy=True))
        exit_cache.check_manifest(directory, manifest, self.config, fingerprint)
        if not manifest["num_sequences"].get("train"):
            raise ValueError(f"--exit-activation-cache {directory}: the cache has no train split")
        self.manifest = manifest
        self.args.seq_length = int(manifest["seq_length"])  # the cache's rows fix it (tokens/s in the log)
        exits, dtype = manifest["exits"], manifest["dtype"]
        self.train_cache = exit_cache.CachedSplit(os.path.join(directory, "train"), exits, dtype)
        has_valid = manifest["num_sequences"].get("valid")
        self.valid_cache = exit_cache.CachedSplit(os.path.join(directory, "valid"), exits, dtype) if has_valid else None
        self._orders: dict[int, np.ndarray] = {}

    def _row(self, sample: int) -> int:
        """Global sample number -> cache row: stored order in epoch 0, then seeded permutations."""
        n = len(self.train_cache)
        epoch, pos = divmod(sample, n)
        if epoch == 0:
            return pos
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.args.seed, epoch]).permutation(n)}
        return int(self._orders[epoch][pos])

    def _micro_batches(self) -> list[dict]:
        mbs, start = self.args.micro_batch_size, self.state.consumed_train_samples
        rows = [[self._row(start + i * mbs + j) for j in range(mbs)] for i in range(self.num_micro)]
        return [self.train_cache.batch(r, self.device) for r in rows]

    def _columns(self, micro: int, batch: dict) -> Columns | None:
        """The micro-batch's candidate set, its negatives seeded by (seed, iteration, micro-batch)."""
        if not self.args.exit_candidate_vocab:
            return None
        gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.iteration * 1009 + micro)
        labels, topk = batch["labels"], batch["topk_ids"]
        return candidate_set(labels, topk, self.config.vocab_size, self.args.exit_candidate_vocab, gen)

    def train_step(self) -> dict[str, float]:
        from megatron.early_exit.parallel.grads import clip_grad_norm

        self.model.train()
        self.model.zero_grad(set_to_none=True)
        a, weights, sums = self.args, self._exit_weights(), {}
        for micro, batch in enumerate(self._micro_batches()):
            with self.autocast:
                total, parts = cached_losses(
                    self.model, batch, weights, a.exit_loss_type, a.kd_temperature, self._columns(micro, batch),
                    probes_only=a.tune_exit_confidence_only,
                )  # fmt: skip
            (total / self.num_micro).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.num_micro
        sums["grad norm"] = clip_grad_norm(self.model, self.pstate, a.clip_grad)
        self.optimizer.step()
        self.scheduler.step()
        self.state.iteration += 1
        self.state.consumed_train_samples += self.samples_per_step
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean of every exit's full-vocabulary losses and agreement over the cached validation
        split (at most --eval-iters global batches)."""
        if self.valid_cache is None:
            return {}
        self.model.eval()
        mbs = self.args.micro_batch_size
        count = min(len(self.valid_cache), self.args.eval_iters * self.args.global_batch_size) // mbs
        sums: dict[str, float] = {}
        for i in range(count):
            batch = self.valid_cache.batch(range(i * mbs, (i + 1) * mbs), self.device)
            with self.autocast:
                _, parts = cached_losses(self.model, batch, self._exit_weights(), "ce+kd", self.args.kd_temperature)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / count
        self.model.train()
        return sums
