"""The single-process training loop: build, (resume), train, evaluate, log, save.

One iteration = one optimizer update over `--global-batch-size` samples, taken as
global/micro micro-batches whose gradients accumulate (each scaled by 1/num_micro so the
update equals one step on the whole global batch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
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
    validate_output_paths,
)
from megatron.early_exit.config import ExitLossConfig
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.model.exits import is_probe_parameter
from megatron.early_exit.parallel.data_parallel import build_data_parallel
from megatron.early_exit.parallel.dims import ParallelDims, initialize
from megatron.early_exit.parallel.grads import (
    barrier,
    build_embedding_group,
    check_replicated_params,
    clip_grad_norm,
    gather_rng_states,
    reduce_loss_parts,
    sync_gradients,
)
from megatron.early_exit.parallel.pipeline import StageSpec, exit_cost, head_cost, split_stages, stages_for
from megatron.early_exit.parallel.state_dict import full_optimizer_state, full_state_dict, load_optimizer_state
from megatron.early_exit.parallel.tensor_parallel import apply_tensor_parallel
from megatron.early_exit.precision import SLOW_BF16, fast_bf16
from megatron.early_exit.training.layer_dropout import LayerDropout, fill_missing_grads
from megatron.early_exit.training.losses import exit_weights_at, rotational_exit_weights
from megatron.early_exit.training.optimizer import LRScheduler, build_optimizer
from megatron.early_exit.training.schedules import (
    ScheduleContext,
    TuneSettings,
    forward_backward_1f1b,
    forward_backward_tune,
    forward_only,
)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA (this process's local GPU under torchrun) when available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


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


class TrainingStopped(Exception):
    """Training cannot go on (a non-finite loss, the data ran out, a checkpoint cannot be written):
    main() prints its message as one line and exits 1."""


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # per-iteration losses
    evals: list[dict[str, float]] = field(default_factory=list)
    checkpoint: str | None = None
    stopped_by_signal: bool = False


class Trainer:
    """Holds what one run needs on this rank; `run()` trains and returns the TrainState.

    Single process and every TP x PP x DP layout go through the same code: this rank
    builds only its pipeline stage, initialises it from the seed by parameter name (so
    the full model is layout-independent), loads the full checkpoint weights it owns,
    and only then applies tensor parallelism from outside.
    """

    fused_optimizer = False  # torch's fused AdamW (`build_optimizer`); the cached tuner's one process sets it

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        try:
            self._setup(args)
        except BaseException:
            self.close()  # a failed start keeps no lock
            raise

    def _setup(self, args: argparse.Namespace) -> None:
        self.rank0 = os.environ.get("RANK", "0") == "0"
        validate_output_paths(args)
        if args.save and self.rank0 and not args.dry_run:
            # One run per save directory; taking the lock also clears dead runs' temporaries and puts
            # back a checkpoint a crashed re-save had set aside, before --load reads it.
            ckpt.lock_save_dir(args.save)
        self.meta = ckpt.read_meta(args.load) if ckpt.has_checkpoint(args.load) else None
        if self.meta is not None:
            ckpt.verify_checkpoint(self.meta.directory)  # every file, before any other check
        if args.load and self.meta is None:
            if not _auto_resume_dir(args):
                raise ValueError(f"--load: no checkpoint in {args.load}")
            if self.rank0:
                print(f" no checkpoint in {args.load} yet (--load = --save): starting from scratch", flush=True)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        tune_pp = args.tune_exit_pipeline_parallel_size if args.tune_exit else None
        dims = ParallelDims(world, args.tensor_model_parallel_size, tune_pp or args.pipeline_model_parallel_size)
        validate_args(args, self.meta.model_config if self.meta else None, data_parallel_size=dims.dp)
        self.num_micro = args.global_batch_size // (args.micro_batch_size * dims.dp)
        fill = (args.num_fill_warmup_microbatches or 0) + args.num_fill_cooldown_microbatches
        # Samples drawn per iteration: bubble filling takes its extra micro-batches from the same stream.
        self.samples_per_step = args.global_batch_size + (
            fill * args.micro_batch_size * dims.dp if args.fill_explicit_bubbles else 0
        )
        self.device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", "0")))
        self._build_tokenizer_and_config()
        dims.validate_model(
            self.config.num_layers, self.config.num_attention_heads, int(self.config.num_query_groups),
            int(self.config.ffn_hidden_size), self.config.vocab_size,
        )  # fmt: skip
        self._check_vocabulary()
        self._check_data()
        if self._resuming():
            self._check_schedule(ckpt.load_training_state(self.meta.directory).get("scheduler"))
        self._install_signal_handler()
        self.pstate = initialize(dims.tp, dims.pp, self.device)
        set_seed(args.seed)
        self._build_stage()
        self.data_parallel = build_data_parallel(self.model, self.pstate, args)  # before the optimizer: FSDP2
        self.loss_cfg: ExitLossConfig = exit_loss_config_from_args(args, self.config.num_exits)
        self.optimizer = build_optimizer(
            self.model, args, allow_empty=args.tune_exit, dp_group=self.pstate.dp_group, fused=self.fused_optimizer
        )
        self.scheduler = LRScheduler(
            self.optimizer, args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters, args.lr_decay_style
        )
        self.state = TrainState()
        if self._resuming():
            self._resume()
        self._build_data()
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if args.bf16 else nullcontext()
        if args.bf16 and not fast_bf16(self.device) and self.pstate.rank == 0:
            print(f"warning: --bf16: {SLOW_BF16}", file=sys.stderr, flush=True)
        self.seq_shards = dims.tp if args.sequence_parallel else 1  # activations between stages
        self.is_logger = self.pstate.rank == 0
        self.tb = self._tensorboard() if self.is_logger and not args.dry_run else None

    # ----- construction ------------------------------------------------------------------

    def _check_vocabulary(self) -> None:
        """Every id the tokenizer makes (its end-of-document id included) must index the embedding."""
        tok, rows = self.tokenizer, self.config.vocab_size
        if max(tok.vocab_size - 1, tok.eod) >= rows:
            source = "the tokenizer" if self.meta is None else f"the tokenizer for {self.meta.directory}"
            raise ValueError(
                f"--tokenizer-type: {source} ({type(tok).__name__}, vocabulary {tok.vocab_size}, end-of-document "
                f"id {tok.eod}) does not fit the model's vocabulary of {rows}"
            )

    def _check_data(self) -> None:
        """Every --data-path prefix: sizes consistent, made by this run's tokenizer, ids within the model."""
        if self.args.mock_data or not self.args.data_path:
            return
        from megatron.early_exit.data import parse_data_path
        from megatron.early_exit.data.checks import check_data_paths

        prefixes, _ = parse_data_path(self.args.data_path)
        for warning in check_data_paths(prefixes, self.tokenizer, self.config.vocab_size):
            if self.rank0:
                print(warning, file=sys.stderr, flush=True)

    def _install_signal_handler(self) -> None:
        """--exit-signal-handler: SIGTERM/SIGINT only set a flag; the loop saves and stops after the iteration."""
        self.signal_received: int | None = None
        if not self.args.exit_signal_handler:
            return

        def handler(signum, frame):
            self.signal_received = signum

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def close(self) -> None:
        """Release the save directory's lock (the process keeps it otherwise until it exits)."""
        if self.args.save and not self.args.dry_run:
            ckpt.unlock_save_dir(self.args.save)

    def _build_tokenizer_and_config(self) -> None:
        args = self.args
        if self.meta is not None:
            check_against_checkpoint(args, self.meta.model_config)
            self.tokenizer = ckpt.load_tokenizer_from(self.meta) or build_tokenizer_from_args(args)
            self.config = self.meta.model_config
        else:
            self.tokenizer = build_tokenizer_from_args(args)
            self.config = model_config_from_args(args, self.tokenizer.vocab_size)

    def _tuning_layers(self) -> tuple[int, bool]:
        """EE-Tuning builds layers only up to the last exit, unless distillation or a
        confidence probe needs the final head's output: (layers to build, final head?)."""
        c = self.config
        needs_final = "kd" in self.args.exit_loss_type or c.use_exit_confidence_head
        return (c.num_layers, True) if needs_final else (max(c.exit_layer_nums), False)

    def _stage_specs(self):
        if not self.args.tune_exit:
            return stages_for(self.config, self.pstate.dims.pp, uniform=self.args.pipeline_split == "uniform")
        layers, final = self._tuning_layers()
        c = self.config
        specs = split_stages(
            layers, self.pstate.dims.pp, c.exit_layer_nums, exit_cost(c), head_cost(c) if final else 0.0
        )
        return [StageSpec(s.index, s.layer_range, s.pre_process, s.post_process and final) for s in specs]

    def _build_stage(self) -> None:
        ps = self.pstate
        specs = self._stage_specs()
        self.stage_spec = specs[ps.pp_rank]
        self.model = EarlyExitGPT(
            self.config, self.stage_spec.pre_process, self.stage_spec.post_process, self.stage_spec.layer_range
        )
        self.model.init_weights(self.args.seed)
        if self.meta is not None:
            missing = ckpt.load_weights_into(
                self.model, ckpt.read_weights(self.meta.directory), self.meta.directory, strict=False
            )
            if missing:
                raise ValueError(f"--load: checkpoint {self.meta.directory} lacks {missing[:5]}")
        self.model.recompute_activations = bool(self.args.recompute_activations or self.args.recompute_granularity)
        if self.args.tune_exit:
            probes_only = getattr(self.args, "tune_exit_confidence_only", False)
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("exits.") and (not probes_only or is_probe_parameter(name)))
            self._check_tunable()
        self.model.to(self.device)
        apply_tensor_parallel(self.model, ps.tp_group, self.args.sequence_parallel)
        self.embedding_group = build_embedding_group(self.config, specs, ps)
        holders = [
            sp.index
            for sp in specs
            if any(sp.layer_range[0] < n <= sp.layer_range[1] for n in self.config.exit_layer_nums)
        ]
        self.last_exit_stage = max(holders) if holders else -1

    def _check_tunable(self) -> None:
        count = torch.tensor(float(sum(p.numel() for p in self.model.parameters() if p.requires_grad)))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(count)
        if count.item() == 0:
            raise ValueError(
                "--tune-exit: the exits in --load have no parameters of their own (tied output only); "
                "add exits with --use-exit-norm/--use-exit-mlp/--untie-exit-output-weights "
                "(tools/checkpoint/add_exits.py)"
            )

    def _resuming(self) -> bool:
        return self.meta is not None and not self.args.finetune and self._continues_run()

    def _continues_run(self) -> bool:
        """Resume the loaded run, or start a new one from its weights? EE-Tuning starts a
        new run from a pretrained (or exits-added) model, and resumes only a tuning run."""
        if not self.args.tune_exit:
            return True
        return bool(self.meta.args.get("tune_exit"))

    def _resume(self) -> None:
        args = self.args
        state = ckpt.load_training_state(self.meta.directory)
        if not args.no_load_optim:
            full = ckpt.load_optimizer_file(self.meta.directory)
            load_optimizer_state(self.model, self.optimizer, full, self.pstate, self.meta.directory)
        if state.get("scheduler") is not None:
            use_saved = args.use_checkpoint_opt_param_scheduler
            self.scheduler.load_state_dict(state["scheduler"], use_saved_settings=use_saved)
        rngs = state.get("rng") or []
        if not args.no_load_rng and len(rngs) == self.pstate.dims.world_size:
            ckpt.set_rng_state(rngs[self.pstate.rank])
        self.state.iteration = int(state["iteration"])
        self.state.consumed_train_samples = int(state["consumed_train_samples"])
        self._print(f"resumed from {self.meta.directory} at iteration {self.state.iteration}")

    def _check_schedule(self, saved: dict | None) -> None:
        """Megatron's rule: a changed LR schedule (or global batch) needs
        --override-opt_param-scheduler (take the flags) or --use-checkpoint-opt_param-scheduler."""
        args = self.args
        if saved is None:
            return
        flags = LRScheduler(None, args.lr, args.min_lr, args.lr_warmup_iters, args.lr_decay_iters, args.lr_decay_style)
        changed = flags.changed_settings(saved)
        gbs = self.meta.args.get("global_batch_size")
        gbs_changed = gbs is not None and gbs != args.global_batch_size
        if gbs_changed:
            changed.append(f"--global-batch-size {gbs} -> {args.global_batch_size}")
        if changed and not (args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler):
            raise ValueError(
                f"--load {self.meta.directory}: the schedule differs from the checkpoint's ({'; '.join(changed)}); "
                "give --override-opt_param-scheduler to use the new values or --use-checkpoint-opt_param-scheduler "
                "to keep the saved ones"
            )
        if gbs_changed and args.use_checkpoint_opt_param_scheduler:
            raise ValueError(
                f"--global-batch-size {args.global_batch_size}: the checkpoint used {gbs}, and "
                "--use-checkpoint-opt_param-scheduler keeps the saved schedule, not the batch size"
            )

    def _build_data(self) -> None:
        from megatron.early_exit.data import build_data_loader, build_datasets

        args = self.args
        gbs = args.global_batch_size
        eval_samples = args.eval_iters * gbs
        kwargs = dict(
            tokenizer=self.tokenizer,
            seq_length=args.seq_length,
            seed=args.seed,
            data_path=args.data_path,
            split=args.split,
            mock_data=args.mock_data,
            train_samples=args.train_iters * self.samples_per_step,
            valid_samples=eval_samples,
            test_samples=eval_samples,
            data_cache_path=args.data_cache_path,
            loss_mask=args.data_loss_mask,
        )
        # Collective: megatron-core builds its index caches on rank 0 first, then the others.
        self.train_ds, self.valid_ds, _ = build_datasets(**kwargs)
        self.train_iter = iter(
            build_data_loader(
                self.train_ds,
                consumed_samples=self.state.consumed_train_samples,
                micro_batch_size=args.micro_batch_size,
                dp_rank=self.pstate.dp_rank,
                dp_size=self.pstate.dims.dp,
                num_workers=args.num_workers,
            )
        )

    def _tensorboard(self):
        if not self.args.tensorboard_dir:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=self.args.tensorboard_dir)

    def _print(self, text: str) -> None:
        if self.pstate.rank == 0:
            print(text, flush=True)

    # ----- one step ----------------------------------------------------------------------

    def _exit_weights(self) -> dict[int, float]:
        weights = exit_weights_at(self.loss_cfg, self.state.iteration)
        if self.args.exit_loss_curriculum == "rotational":
            weights = rotational_exit_weights(weights, self.state.iteration, self.args.exit_loss_rotation_size)
        return dict(zip(self.config.exit_layer_nums, weights))

    def _layer_dropout(self) -> LayerDropout | None:
        a = self.args
        if not a.layer_dropout_max:
            return None
        return LayerDropout(
            a.layer_dropout_max,
            self.config.num_layers,
            a.seed,
            a.layer_dropout_curriculum,
            a.layer_dropout_warmup_iters,
        )

    def _context(self) -> ScheduleContext:
        a = self.args
        return ScheduleContext(
            model=self.model,
            pstate=self.pstate,
            loss_cfg=self.loss_cfg,
            exit_weights=self._exit_weights(),
            num_micro=self.num_micro,
            activation_shape=(a.micro_batch_size, a.seq_length // self.seq_shards, self.config.hidden_size),
            device=self.device,
            autocast=self.autocast,
            last_exit_stage=self.last_exit_stage,
            grad_sync=self.data_parallel,
            layer_dropout=self._layer_dropout(),
            iteration=self.state.iteration,
        )

    def _next_batches(self, iterator, count: int) -> list[dict]:
        try:
            return [next(iterator) for _ in range(count)]
        except StopIteration:
            raise TrainingStopped(
                f"the data ran out at iteration {self.state.iteration + 1}, "
                f"before --train-iters {self.args.train_iters}"
            ) from None

    def train_step(self) -> dict[str, float]:
        """One optimizer update over a global batch; returns the mean loss of each head."""
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        a = self.args
        batches = self._next_batches(self.train_iter, self.num_micro)
        if a.tune_exit:
            tune = TuneSettings(a.exit_loss_type, a.kd_temperature)
            parts = forward_backward_tune(self._context(), batches, tune)
        else:
            n_warm = (a.num_fill_warmup_microbatches or 0) if a.fill_explicit_bubbles else 0
            n_cool = a.num_fill_cooldown_microbatches if a.fill_explicit_bubbles else 0
            fills = self._next_batches(self.train_iter, n_warm + n_cool)
            parts = forward_backward_1f1b(self._context(), batches, fills[:n_warm], fills[n_warm:])
            if a.layer_dropout_max:
                fill_missing_grads(self.model)  # a layer every micro-batch skipped: zero, on every rank alike
        sync_gradients(self.model, self.pstate, self.embedding_group, self.args.sequence_parallel, self.data_parallel)
        sharded = getattr(self.data_parallel, "is_sharded", False)
        grad_norm = clip_grad_norm(self.model, self.pstate, self.args.clip_grad, sharded)
        parts = reduce_loss_parts(parts, self.pstate)  # the same on every rank: all stop together
        self._check_finite({**parts, "grad norm": grad_norm})
        if self.optimizer is not None:  # a tuning stage without exits has nothing to update
            self.optimizer.step()
        self.scheduler.step()
        self.state.iteration += 1
        self.state.consumed_train_samples += self.samples_per_step
        if self.args.check_replicated_params:
            self.replicated_checked = check_replicated_params(self.model, self.pstate, self.embedding_group, sharded)
        parts["grad norm"] = grad_norm
        return parts

    def _check_finite(self, values: dict[str, float]) -> None:
        """Stop before the update when a loss or the gradient norm is NaN or infinite."""
        bad = [(k, v) for k, v in values.items() if not math.isfinite(v)]
        if bad:
            name, value = bad[0]
            raise TrainingStopped(
                f"non-finite {name} ({value}) at iteration {self.state.iteration + 1}: training stopped before the "
                f"update, nothing saved (last checkpoint: {self.state.checkpoint or self._loaded_from()})"
            )

    def _loaded_from(self) -> str:
        return self.meta.directory if self.meta is not None else "none"

    def _weights_finite(self) -> bool:
        bad = torch.tensor(float(any(not torch.isfinite(p).all() for p in self.model.parameters())))
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        return bad.item() == 0

    def _stop_requested(self) -> bool:
        """Has any rank received SIGTERM/SIGINT (--exit-signal-handler)? Every rank gets the same answer."""
        if not self.args.exit_signal_handler:
            return False
        flag = torch.tensor(0.0 if self.signal_received is None else 1.0)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return flag.item() > 0

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss of every head over --eval-iters global batches of the validation split."""
        from megatron.early_exit.data import build_data_loader

        if self.valid_ds is None:
            return {}
        self.model.eval()
        loader = iter(
            build_data_loader(
                self.valid_ds,
                consumed_samples=0,
                micro_batch_size=self.args.micro_batch_size,
                dp_rank=self.pstate.dp_rank,
                dp_size=self.pstate.dims.dp,
            )
        )
        ctx = self._context()
        sums: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(self.args.eval_iters):
                batches = self._next_batches(loader, self.num_micro)
                parts = forward_only(ctx, batches)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v / self.args.eval_iters
        self.model.train()
        return reduce_loss_parts(sums, self.pstate)

    # ----- the loop ----------------------------------------------------------------------

    def run(self) -> TrainState:
        try:
            return self._run()
        finally:
            if self.tb is not None:
                self.tb.close()
            self.close()

    def _run(self) -> TrainState:
        args = self.args
        self._print(self.describe())
        if args.dry_run:
            self._print(f" dry run: everything built and checked; stopping before iteration {self.state.iteration + 1}")
            return self.state
        log = IntervalLog(args, self.tb) if self.is_logger else None
        while self.state.iteration < args.train_iters:
            parts = self.train_step()
            self.state.history.append({"iteration": self.state.iteration, **parts})
            if log is not None:
                log.add(self.state.iteration, parts, self.scheduler.lr, args.global_batch_size * args.seq_length)
            if args.eval_interval and self.state.iteration % args.eval_interval == 0:
                self._log_eval()
            if args.save and args.save_interval and self.state.iteration % args.save_interval == 0:
                self.save()
            if args.exit_interval and self.state.iteration % args.exit_interval == 0:
                self._print(f" exiting at iteration {self.state.iteration} (--exit-interval)")
                break
            if self._stop_requested():
                self.state.stopped_by_signal = True
                break
        if args.check_replicated_params and self.state.history:
            self._print(
                f" replicated parameters identical across ranks after every step "
                f"({getattr(self, 'replicated_checked', 0)} comparisons per step on rank 0)"
            )
        if args.eval_interval and self.state.iteration % args.eval_interval != 0 and not self.state.stopped_by_signal:
            self._log_eval()
        saved = self.state.checkpoint and self.state.checkpoint.endswith(f"{self.state.iteration:07d}")
        if args.save and not saved:
            self.save()
        if self.state.stopped_by_signal:
            name = signal.Signals(self.signal_received).name if self.signal_received else "a signal (on another rank)"
            where = f", checkpoint saved to {self.state.checkpoint}" if args.save else " (no --save: nothing saved)"
            self._print(f" {name} received: stopped after iteration {self.state.iteration}{where}")
        return self.state

    def _log_eval(self) -> None:
        result = self.evaluate()
        if not result:
            return
        self.state.evals.append({"iteration": self.state.iteration, **result})
        body = " | ".join(f"{k}: {v:.6E}" for k, v in result.items())
        self._print(f" validation loss at iteration {self.state.iteration} | {body}")
        if self.tb is not None:
            for k, v in result.items():
                self.tb.add_scalar(f"validation/{k}", v, self.state.iteration)

    def save(self) -> None:
        if not self._weights_finite():
            raise TrainingStopped(
                f"non-finite weights at iteration {self.state.iteration}: not saved "
                f"(last checkpoint: {self.state.checkpoint or self._loaded_from()})"
            )
        weights = full_state_dict(self.model, self.pstate)
        optim = full_optimizer_state(self.model, self.optimizer, self.pstate)
        if self.args.tune_exit and weights is not None:
            # Tuning built only part of the model: the rest comes unchanged from --load.
            weights = {**ckpt.read_weights(self.meta.directory), **weights}
        rngs = gather_rng_states(self.pstate, ckpt.rng_state())
        path = None
        if self.pstate.rank == 0:
            path = ckpt.save_checkpoint(
                self.args.save,
                self.state.iteration,
                None,
                self.tokenizer,
                weights=weights,
                model_config=self.config,
                optimizer_state=optim,
                scheduler=self.scheduler,
                consumed_samples=self.state.consumed_train_samples,
                args=vars(self.args),
                rng_states=rngs,
            )
            print(f" saved checkpoint at iteration {self.state.iteration} to {path}", flush=True)
        barrier()
        self.state.checkpoint = path or ckpt.iteration_dir(self.args.save, self.state.iteration)

    def describe(self) -> str:
        c = self.config
        d = self.pstate.dims
        return (
            f"model: {c.num_layers} layers, hidden {c.hidden_size}, heads {c.num_attention_heads}, "
            f"vocab {c.vocab_size}, exits after layers {c.exit_layer_nums or 'none'} | "
            f"stage 0 parameters: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M | "
            f"layout TP{d.tp} x PP{d.pp} x DP{d.dp} | device {self.device} | "
            f"{'bf16 autocast' if self.args.bf16 else 'fp32'} | start iteration {self.state.iteration}"
        )


class IntervalLog:
    """Megatron-style log lines (averages over the interval), TensorBoard and JSON lines."""

    def __init__(self, args, tb) -> None:
        self.args, self.tb = args, tb
        self.start = time.time()
        self.last = time.time()
        self.sums: dict[str, float] = {}
        self.count = 0
        self.tokens = 0
        self.jsonl = None
        if args.log_jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(args.log_jsonl)), exist_ok=True)
            self.jsonl = open(args.log_jsonl, "a")

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
        losses = " | ".join(f"{k}: {v:.6E}" for k, v in means.items() if k.endswith(("loss", "agreement")))
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
    trainer = None
    try:
        if args.exit_activation_cache:  # EE-Tuning from cached activations (training/cached_tuning.py)
            from megatron.early_exit.training.cached_tuning import CachedTuner as cls
        else:
            cls = Trainer
        trainer = cls(args)
        return trainer.run()
    except (ValueError, OSError) as e:  # a flag, a path or a checkpoint: found before training
        _fail(e, 2 if trainer is None else 1)
    except TrainingStopped as e:
        _fail(e, 1)
    except KeyboardInterrupt:
        it = trainer.state.iteration if trainer is not None else 0
        _fail(
            f"interrupted at iteration {it}; nothing saved since the last checkpoint (--exit-signal-handler saves)", 130
        )
    finally:
        if trainer is not None:
            trainer.close()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _fail(message, code: int) -> None:
    if os.environ.get("RANK", "0") == "0":
        sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _auto_resume_dir(args: argparse.Namespace) -> bool:
    """`--load D --save D` with D absent or holding no checkpoint starts from scratch (Megatron's
    auto-resume); any other --load without a checkpoint is an error."""
    if args.tune_exit or not args.save:
        return False
    if os.path.realpath(args.load) != os.path.realpath(args.save):
        return False
    return not os.path.exists(args.load) or (os.path.isdir(args.load) and not ckpt.has_checkpoint(args.load))
