"""The single-process training loop: build, (resume), train, evaluate, log, save.

One iteration = one optimizer update over `--global-batch-size` samples, taken as
global/micro micro-batches whose gradients accumulate (each scaled by 1/num_micro so the
update equals one step on the whole global batch).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch

from megatron.early_exit import checkpointing as ckpt
from megatron.early_exit.arguments import (
    check_against_checkpoint,
    exit_loss_config_from_args,
    model_config_from_args,
    validate_args,
)
from megatron.early_exit.config import ExitLossConfig
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.training.losses import combine_losses, exit_weights_at
from megatron.early_exit.training.optimizer import LRScheduler, build_optimizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def build_tokenizer_from_args(args: argparse.Namespace):
    from megatron.early_exit.tokenizer import build_tokenizer

    if args.tokenizer_type is None:
        raise ValueError("--tokenizer-type is required when not loading a checkpoint")
    return build_tokenizer(
        args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model,
        vocab_size=args.vocab_size,
    )


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # per-iteration losses
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None


class Trainer:
    """Holds what one run needs; `run()` trains and returns the TrainState."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.meta = ckpt.read_meta(args.load) if ckpt.has_checkpoint(args.load) else None
        if args.load and self.meta is None:
            raise ValueError(f"--load: no checkpoint in {args.load}")
        validate_args(args, self.meta.model_config if self.meta else None)
        self.device = resolve_device(args.device)
        set_seed(args.seed)
        self._build_model_and_tokenizer()
        self.loss_cfg: ExitLossConfig = exit_loss_config_from_args(args, self.model.config.num_exits)
        self.optimizer = build_optimizer(self.model, args)
        self.scheduler = LRScheduler(
            self.optimizer, args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters, args.lr_decay_style
        )
        self.state = TrainState()
        if self.meta is not None and not args.finetune:
            self._resume()
        self._build_data()
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
        )
        self.num_micro = args.global_batch_size // args.micro_batch_size
        self.tb = self._tensorboard()

    # ----- construction ------------------------------------------------------------------

    def _build_model_and_tokenizer(self) -> None:
        args = self.args
        if self.meta is not None:
            check_against_checkpoint(args, self.meta.model_config)
            self.tokenizer = ckpt.load_tokenizer_from(self.meta) or build_tokenizer_from_args(args)
            config = self.meta.model_config
        else:
            self.tokenizer = build_tokenizer_from_args(args)
            config = model_config_from_args(args, self.tokenizer.vocab_size)
        self.model = EarlyExitGPT(config)
        self.model.init_weights(args.seed)
        if self.meta is not None:
            ckpt.load_weights_into(self.model, ckpt.read_weights(self.meta.directory), self.meta.directory)
        self.model.recompute_activations = bool(args.recompute_activations or args.recompute_granularity)
        self.model.to(self.device)

    def _resume(self) -> None:
        state = ckpt.load_training_state(
            self.meta.directory,
            optimizer=None if self.args.no_load_optim else self.optimizer,
            scheduler=self.scheduler,
            load_rng=not self.args.no_load_rng,
        )
        self.state.iteration = int(state["iteration"])
        self.state.consumed_train_samples = int(state["consumed_train_samples"])
        print(f"resumed from {self.meta.directory} at iteration {self.state.iteration}", flush=True)

    def _build_data(self) -> None:
        from megatron.early_exit.data import build_data_loader, build_datasets

        args = self.args
        gbs = args.global_batch_size
        eval_samples = args.eval_iters * gbs
        self.train_ds, self.valid_ds, _ = build_datasets(
            tokenizer=self.tokenizer,
            seq_length=args.seq_length,
            seed=args.seed,
            data_path=args.data_path,
            split=args.split,
            mock_data=args.mock_data,
            train_samples=args.train_iters * gbs,
            valid_samples=eval_samples,
            test_samples=eval_samples,
            data_cache_path=args.data_cache_path,
        )
        self.train_iter = iter(
            build_data_loader(
                self.train_ds,
                consumed_samples=self.state.consumed_train_samples,
                micro_batch_size=args.micro_batch_size,
                num_workers=args.num_workers,
            )
        )

    def _tensorboard(self):
        if not self.args.tensorboard_dir:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.args.tensorboard_dir)

    # ----- one step ----------------------------------------------------------------------

    def _forward_loss(self, batch, exit_weights):
        tokens = batch["tokens"].to(self.device)
        labels = batch["labels"].to(self.device)
        loss_mask = batch["loss_mask"].to(self.device)
        position_ids = batch["position_ids"].to(self.device)
        with self.autocast:
            out = self.model(
                tokens,
                position_ids=position_ids,
                labels=labels,
                return_exit_confidences=self.loss_cfg.use_dynamic_exit_layer_weight,
            )
        return combine_losses(
            out, loss_mask, exit_weights, self.loss_cfg.final_layer_weight, self.loss_cfg.use_dynamic_exit_layer_weight
        )

    def _exit_weights(self) -> dict[int, float]:
        weights = exit_weights_at(self.loss_cfg, self.state.iteration)
        return dict(zip(self.model.config.exit_layer_nums, weights))

    def train_step(self) -> dict[str, float]:
        """One optimizer update over a global batch; returns the mean loss of each head."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        weights = self._exit_weights()
        sums: dict[str, float] = {}
        for _ in range(self.num_micro):
            try:
                batch = next(self.train_iter)
            except StopIteration:
                raise RuntimeError("the training data ran out before --train-iters") from None
            total, parts = self._forward_loss(batch, weights)
            (total / self.num_micro).backward()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v) / self.num_micro
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.args.clip_grad > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.args.clip_grad)
        else:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        self.optimizer.step()
        self.scheduler.step()
        self.state.iteration += 1
        self.state.consumed_train_samples += self.args.global_batch_size
        sums["grad norm"] = float(grad_norm)
        return sums

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss of every head over --eval-iters global batches of the validation split."""
        from megatron.early_exit.data import build_data_loader

        if self.valid_ds is None:
            return {}
        self.model.eval()
        loader = build_data_loader(self.valid_ds, consumed_samples=0, micro_batch_size=self.args.micro_batch_size)
        weights = self._exit_weights()
        sums: dict[str, float] = {}
        count = 0
        for i, batch in enumerate(loader):
            if i >= self.args.eval_iters * self.num_micro:
                break
            _, parts = self._forward_loss(batch, weights)
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            count += 1
        self.model.train()
        return {k: v / max(count, 1) for k, v in sums.items()}

    # ----- the loop ----------------------------------------------------------------------

    def run(self) -> TrainState:
        args = self.args
        log = IntervalLog(args, self.model.config.exit_layer_nums, self.tb)
        print(self.describe(), flush=True)
        while self.state.iteration < args.train_iters:
            parts = self.train_step()
            self.state.history.append({"iteration": self.state.iteration, **parts})
            log.add(self.state.iteration, parts, self.scheduler.lr, args.global_batch_size * args.seq_length)
            if args.eval_interval and self.state.iteration % args.eval_interval == 0:
                self._log_eval()
            if args.save and args.save_interval and self.state.iteration % args.save_interval == 0:
                self.save()
        if args.eval_interval and self.state.iteration % args.eval_interval != 0:
            self._log_eval()
        if args.save and (not self.state.checkpoint or not self.state.checkpoint.endswith(f"{self.state.iteration:07d}")):
            self.save()
        if self.tb is not None:
            self.tb.close()
        return self.state

    def _log_eval(self) -> None:
        result = self.evaluate()
        if not result:
            return
        self.state.evals.append({"iteration": self.state.iteration, **result})
        body = " | ".join(f"{k}: {v:.6E}" for k, v in result.items())
        print(f" validation loss at iteration {self.state.iteration} | {body}", flush=True)
        if self.tb is not None:
            for k, v in result.items():
                self.tb.add_scalar(f"validation/{k}", v, self.state.iteration)

    def save(self) -> None:
        path = ckpt.save_checkpoint(
            self.args.save,
            self.state.iteration,
            self.model,
            self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            consumed_samples=self.state.consumed_train_samples,
            args=vars(self.args),
        )
        self.state.checkpoint = path
        print(f" saved checkpoint at iteration {self.state.iteration} to {path}", flush=True)

    def describe(self) -> str:
        c = self.model.config
        n = sum(p.numel() for p in self.model.parameters())
        n_exit = sum(p.numel() for name, p in self.model.named_parameters() if "exit" in name)
        return (
            f"model: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_attention_heads}, "
            f"vocab {c.vocab_size}, {n / 1e6:.2f}M parameters ({n_exit / 1e6:.2f}M in exits), "
            f"exits after layers {c.exit_layer_nums or 'none'} | device {self.device} | "
            f"{'bf16 autocast' if self.args.bf16 else 'fp32'} | start iteration {self.state.iteration}"
        )


class IntervalLog:
    """Megatron-style log lines (averages over the interval), TensorBoard and JSON lines."""

    def __init__(self, args, exit_layers, tb) -> None:
        self.args, self.exit_layers, self.tb = args, exit_layers, tb
        self.start = time.time()
        self.last = time.time()
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0
        self.jsonl = open(args.log_jsonl, "a") if args.log_jsonl else None

    def add(self, iteration: int, parts: dict[str, float], lr: float, tokens: int) -> None:
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.tokens += tokens
        if iteration % self.args.log_interval == 0 or iteration == self.args.train_iters:
            self._emit(iteration, lr)

    def _emit(self, iteration: int, lr: float) -> None:
        now = time.time()
        elapsed = now - self.last
        means = {k: v / self.count for k, v in self.sums.items()}
        record = {
            "iteration": iteration,
            **{k: means[k] for k in means if k != "grad norm"},
            "grad norm": means.get("grad norm"),
            "lr": lr,
            "tokens_per_sec": self.tokens / max(elapsed, 1e-9),
            "ms_per_iter": 1000 * elapsed / self.count,
            "elapsed_s": now - self.start,
        }
        losses = " | ".join(f"{k}: {v:.6E}" for k, v in means.items() if k.endswith("loss"))
        total = int(now - self.start)
        print(
            f" iteration {iteration:8d}/{self.args.train_iters:8d} | "
            f"elapsed time per iteration (ms): {record['ms_per_iter']:.1f} | learning rate: {lr:.3E} | "
            f"{losses} | grad norm: {record['grad norm']:.3f} | tokens/s: {record['tokens_per_sec']:.0f} | "
            f"elapsed: {total // 3600:02d}:{total // 60 % 60:02d}:{total % 60:02d}",
            flush=True,
        )
        if self.tb is not None:
            for k, v in record.items():
                if k != "iteration" and v is not None:
                    self.tb.add_scalar(f"train/{k}", v, iteration)
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        self.sums, self.count, self.tokens, self.last = {}, 0, 0, now


def main(argv: list[str] | None = None) -> TrainState:
    """Entry point: flag errors are one line on stderr and exit code 2, no traceback."""
    from megatron.early_exit.arguments import parse_args

    args = parse_args(argv, prog=os.path.basename(sys.argv[0]) if argv is None else "pretrain_early_exit_gpt.py")
    try:
        trainer = Trainer(args)
    except ValueError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    return trainer.run()
