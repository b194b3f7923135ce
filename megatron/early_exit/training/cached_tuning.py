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

`--exit-candidate-vocab N` replaces the vocabulary by a candidate set per micro-batch: every
label, every cached top-k id, and N negatives drawn uniformly without replacement from the
vocabulary, shared by the micro-batch. A candidate drawn only as a negative was included
with probability N/V, so its logit is corrected by -log(N/V) (sampled softmax, Jean et al.
2015); the labels and top-k are always included (correction log 1 = 0). With N = V the
candidate loss equals the full one. The agreement a probe learns is then the exit's argmax
over the candidates. Validation always projects onto the whole vocabulary.

Epoch 0 reads the cache in stored order (megatron-core's dataset order: the same first
batches as tuning through the backbone), later epochs a permutation seeded by (seed, epoch).
"""

from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from megatron.early_exit import checkpointing as ckpt
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
    if args.exit_candidate_vocab is not None and args.exit_candidate_vocab < 1:
        raise ValueError(f"--exit-candidate-vocab must be >= 1, got {args.exit_candidate_vocab}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.tensor_model_parallel_size > 1:
        raise ValueError("--exit-activation-cache runs in one process (no torchrun, no tensor parallelism)")
    if args.tune_exit_pipeline_parallel_size not in (None, 1) or args.pipeline_model_parallel_size > 1:
        raise ValueError("--exit-activation-cache runs in one process (no pipeline parallelism)")
    if not os.path.isdir(args.exit_activation_cache):
        raise ValueError(f"--exit-activation-cache {args.exit_activation_cache}: no such directory")


# ----- candidate set -------------------------------------------------------------------


def candidate_set(labels, topk_ids, vocab_size: int, num_negatives: int, generator) -> tuple:
    """(ids [m] sorted, log inclusion probability [m]): labels and top-k always, plus
    `num_negatives` uniform negatives without replacement (inclusion probability N/V)."""
    fixed = torch.unique(torch.cat([labels.flatten(), topk_ids.flatten()]))
    n = min(num_negatives, vocab_size)
    negatives = torch.randperm(vocab_size, generator=generator)[:n].to(fixed.device)
    ids = torch.unique(torch.cat([fixed, negatives]))
    log_q = torch.where(torch.isin(ids, fixed), 0.0, math.log(n / vocab_size))
    return ids, log_q.float()


def exit_log_probs(model, head, hidden, candidates=None, temperature: float = 1.0):
    """The exit's log-softmax of logits / T: [b, s, V], or [b, s, m] over the candidates
    (with the sampled-softmax correction), and a function mapping token ids to its columns."""
    weight = head.output_layer.weight if head.output_layer is not None else model.tied_output_weight()
    if candidates is None:
        logits = head.project(hidden, weight)  # (b, s, h) @ (h, V)
        return torch.log_softmax(logits.float() / temperature, -1), lambda ids: ids
    ids, log_q = candidates
    logits = torch.matmul(hidden, weight[ids].t()) / head.temperature  # (b, s, h) @ (h, m)
    lp = torch.log_softmax(logits.float() / temperature - log_q, -1)
    return lp, lambda tokens: torch.searchsorted(ids, tokens)


# ----- the objective -------------------------------------------------------------------


def _kd(lp_t, topk_lp, topk_cols, kd_temperature: float):
    """T^2 * KL(teacher top-k renormalised || student) on the top-k: [b, s]."""
    student = lp_t.gather(-1, topk_cols)  # (b, s, k)
    teacher = torch.log_softmax(topk_lp / kd_temperature, -1)
    return (teacher.exp() * (teacher - student)).sum(-1) * kd_temperature**2


def exit_terms(model, n: int, batch: dict, rotary, loss_type: str, kd_t: float, candidates=None):
    """One exit's per-token losses and logged parts from its cached input."""
    head = model.exits[str(n)]
    hidden = head.hidden(batch["hidden"][n].float(), rotary)
    lp, cols = exit_log_probs(model, head, hidden, candidates)
    mask = batch["loss_mask"]
    ce = -lp.gather(-1, cols(batch["labels"]).unsqueeze(-1)).squeeze(-1)
    parts = {f"exit_{n} loss": masked_mean(ce, mask).detach()}
    per_token = ce if "ce" in loss_type.split("+") else torch.zeros_like(ce)
    if "kd" in loss_type:
        lp_t = lp if kd_t == 1.0 else exit_log_probs(model, head, hidden, candidates, kd_t)[0]
        kd = _kd(lp_t, batch["topk_logprobs"], cols(batch["topk_ids"]), kd_t)
        parts[f"exit_{n} kd loss"] = masked_mean(kd, mask).detach()
        per_token = per_token + kd
    top = lp.detach().argmax(-1)
    top = candidates[0][top] if candidates is not None else top
    agree = (top == batch["topk_ids"][..., 0]).float()
    parts[f"exit_{n} agreement"] = masked_mean(agree, mask)
    probe = None
    if head.confidence is not None:
        bce = F.binary_cross_entropy_with_logits(
            head.confidence_logit(hidden.detach()).float(), agree, reduction="none"
        )
        probe = masked_mean(bce, mask)
        parts[f"exit_{n} confidence loss"] = probe.detach()
    return masked_mean(per_token, mask), probe, parts


def cached_losses(model, batch: dict, exit_weights: dict[int, float], loss_type: str, kd_t: float, candidates=None):
    """The tuning objective of every exit from one cached micro-batch: (total, parts)."""
    s = batch["labels"].shape[1]
    positions = torch.arange(s, device=batch["labels"].device).unsqueeze(0)
    rotary = model.rotary(positions) if model.rotary is not None else None
    total, parts = None, {}
    for n in model.exit_layer_numbers:
        loss, probe, p = exit_terms(model, n, batch, rotary, loss_type, kd_t, candidates)
        term = exit_weights[n] * loss + (probe if probe is not None else 0.0)
        total = term if total is None else total + term
        parts.update(p)
    return total, parts


# ----- the trainer ---------------------------------------------------------------------


class CachedTuner(Trainer):
    """`Trainer` for `--tune-exit --exit-activation-cache DIR`: same optimizer, schedule,
    logging and checkpoints; the micro-batches come from the cache and only exits run."""

    def _tuning_layers(self) -> tuple[int, bool]:
        return max(self.config.exit_layer_nums), False  # the layers are loaded, never run

    def _build_data(self) -> None:
        directory = self.args.exit_activation_cache
        manifest = exit_cache.read_manifest(directory)
        fingerprint = exit_cache.backbone_fingerprint(self.config, ckpt.read_weights(self.meta.directory))
        exit_cache.check_manifest(directory, manifest, self.config, fingerprint)
        if not manifest["num_sequences"].get("train"):
            raise ValueError(f"--exit-activation-cache {directory}: the cache has no train split")
        self.manifest = manifest
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

    def _candidates(self, batch: dict, micro: int):
        if not self.args.exit_candidate_vocab:
            return None
        gen = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.iteration * 1009 + micro)
        return candidate_set(
            batch["labels"], batch["topk_ids"], self.config.vocab_size, self.args.exit_candidate_vocab, gen
        )

    def train_step(self) -> dict[str, float]:
        from megatron.early_exit.parallel.grads import clip_grad_norm

        self.model.train()
        self.model.zero_grad(set_to_none=True)
        a, weights, sums = self.args, self._exit_weights(), {}
        for micro, batch in enumerate(self._micro_batches()):
            with self.autocast:
                total, parts = cached_losses(
                    self.model, batch, weights, a.exit_loss_type, a.kd_temperature, self._candidates(batch, micro)
                )
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
