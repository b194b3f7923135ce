"""Megatron-style command-line arguments, validated in one place.

`parse_args` returns a plain namespace (Megatron's names, dashes -> underscores);
`validate_args` checks every flag before any work starts and raises ValueError with a
message naming the flag; `model_config_from_args` / `exit_loss_config_from_args` turn the
namespace into the dataclasses the rest of the code reads.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from megatron.early_exit.config import ExitLossConfig, ModelConfig, pad_vocab_size

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Flags that describe the model's shape. With --load they come from the checkpoint; given
# on the command line as well, they must agree with it.
MODEL_FLAGS = {
    "num_layers": "--num-layers",
    "hidden_size": "--hidden-size",
    "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads",
    "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels",
    "max_position_embeddings": "--max-position-embeddings",
    "normalization": "--normalization",
    "norm_epsilon": "--norm-epsilon",
    "swiglu": "--swiglu",
    "position_embedding_type": "--position-embedding-type",
    "rotary_base": "--rotary-base",
    "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
    "exit_layer_nums": "--exit-layer-nums",
    "pre_exit": "--pre-exit",
    "use_exit_norm": "--use-exit-norm",
    "use_exit_mlp": "--use-exit-mlp",
    "use_exit_block": "--use-exit-block",
    "untie_exit_output_weights": "--untie-exit-output-weights",
    "use_exit_confidence_head": "--use-exit-confidence-head",
    "exit_confidence_input": "--exit-confidence-input",
    "exit_confidence_hidden_size": "--exit-confidence-hidden-size",
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump).

    `name_prog`: start the line with the program's name (`prog: error: ...`) or not (`error: ...`).
    """

    def __init__(self, *args, name_prog: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.name_prog = name_prog

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = f"{self.prog}: " if self.name_prog else ""
        sys.stderr.write(f"{prefix}error: {message}\n")
        sys.exit(2)


def run_tool(run: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> None:
    """A command-line tool's body, under torchrun or not: a ValueError or OSError becomes one
    line on rank 0's stderr (every rank fails alike) and exit code 2; the process group, if
    one was started, is torn down on the way out."""
    try:
        run(args)
    except (ValueError, OSError) as e:
        if os.environ.get("RANK", "0") == "0":
            sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog=prog, description="Train an early-exit GPT (EE-LLM / EE-Tuning).")
    _add_model_args(p)
    _add_exit_args(p)
    _add_layerskip_args(p)
    _add_tuning_args(p)
    _add_training_args(p)
    _add_data_args(p)
    _add_checkpoint_args(p)
    _add_logging_args(p)
    _add_parallel_args(p)
    return p


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int)
    g.add_argument("--hidden-size", type=int)
    g.add_argument("--ffn-hidden-size", type=int, help="default 4 * hidden size")
    g.add_argument("--num-attention-heads", type=int)
    g.add_argument("--group-query-attention", action="store_true", help="accepted for Megatron compatibility")
    g.add_argument("--num-query-groups", type=int)
    g.add_argument("--kv-channels", type=int, help="head dim; default hidden / heads")
    g.add_argument("--seq-length", type=int)
    g.add_argument("--max-position-embeddings", type=int, help="default --seq-length")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"])
    g.add_argument("--norm-epsilon", type=float)
    g.add_argument("--swiglu", action="store_true", default=None)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"])
    g.add_argument("--rotary-base", type=float)
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0, help="default 0 (Megatron: 0.1)")
    g.add_argument("--attention-dropout", type=float, default=0.0, help="default 0 (Megatron: 0.1)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)


def _add_exit_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("early exit")
    g.add_argument("--exit-layer-nums", type=int, nargs="+", help="1-based layers with an exit after them")
    g.add_argument("--pre-exit", action="store_true", default=None, help="exits read the layer's input")
    g.add_argument("--use-exit-norm", action="store_true", default=None)
    g.add_argument("--use-exit-mlp", action="store_true", default=None)
    g.add_argument("--use-exit-block", action="store_true", default=None)
    g.add_argument("--untie-exit-output-weights", action="store_true", default=None)
    g.add_argument("--exit-layer-temperature", type=float, nargs="+")
    g.add_argument("--exit-layer-weight", type=float, nargs="+", help="loss weight per exit (default 1.0)")
    g.add_argument("--exit-layer-weight-init", type=float, nargs="+", help="weights at iteration 0")
    g.add_argument("--exit-layer-weight-warmup-iters", type=int, default=0)
    g.add_argument("--exit-layer-weight-warmup-style", choices=["linear", "cosine"], default="linear")
    g.add_argument("--use-dynamic-exit-layer-weight", action="store_true")
    g.add_argument(
        "--use-exit-confidence-head",
        action="store_true",
        default=None,
        help="each exit gets a confidence probe, trained (detached) to predict that its top-1 is the label",
    )
    g.add_argument(
        "--exit-confidence-input",
        choices=["exit", "backbone"],
        default=None,
        help="what the probe reads: the exit's hidden state (default) or, through its own norm, the "
        "backbone's at the exit's depth (a check that does not fire then skips the exit's MLP)",
    )
    g.add_argument(
        "--exit-confidence-hidden-size",
        type=int,
        default=None,
        help="0 (default): the probe is one linear map; k > 0: Linear(hidden, k) -> GELU -> Linear(k, 1)",
    )


def _add_layerskip_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LayerSkip (arXiv 2404.16710)")
    g.add_argument(
        "--layer-dropout-max", type=float, default=0.0, help="last layer's skip rate; rises as e^(l ln2/(L-1)) - 1"
    )
    g.add_argument("--layer-dropout-curriculum", choices=["none", "linear"], default="none")
    g.add_argument("--layer-dropout-warmup-iters", type=int, default=0, help="linear: iterations to reach the rate")
    g.add_argument("--exit-loss-curriculum", choices=["none", "rotational"], default="none")
    g.add_argument("--exit-loss-rotation-size", type=int, default=1, help="rotational: exits trained per iteration")
    g.add_argument(
        "--fill-explicit-bubbles",
        action="store_true",
        help="train exits on extra micro-batches run in pipeline bubbles (EE-LLM); with one stage they run "
        "in sequence (the objective PP runs are checked against); not with --tune-exit",
    )
    g.add_argument(
        "--num-fill-warmup-microbatches",
        type=int,
        help="extra micro-batches per iteration run at the warm-up bubble (default: 1)",
    )
    g.add_argument(
        "--num-fill-cooldown-microbatches",
        type=int,
        default=0,
        help="extra micro-batches per iteration run after the cool-down",
    )


def _add_tuning_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("EE-Tuning (tune the exits of a loaded model, backbone frozen)")
    g.add_argument("--tune-exit", action="store_true", help="train only exit parameters; needs --load")
    g.add_argument("--tune-exit-pipeline-parallel-size", type=int, help="pipeline stages for tuning")
    g.add_argument(
        "--tune-exit-confidence-only", action="store_true",
        help="with --tune-exit: train only the exits' confidence probes, the exits frozen (what a probe learns, "
        "whether its exit's top token is the final head's, then stays put while it learns it)",
    )  # fmt: skip
    g.add_argument(
        "--exit-loss-type",
        choices=["ce", "kd", "ce+kd"],
        default="ce",
        help="cross-entropy, distillation from the final head, or both (tuning only)",
    )
    g.add_argument("--kd-temperature", type=float, default=1.0)
    g.add_argument("--exit-activation-cache", help="tune from this cache (tools/checkpoint/cache_exit_activations.py)")
    g.add_argument(
        "--exit-candidate-vocab", type=int, help="cached tuning: N sampled negatives instead of the vocabulary"
    )


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=1)
    g.add_argument("--global-batch-size", type=int, help="default micro batch * data parallel size")
    g.add_argument("--train-iters", type=int)
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine"], default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float)
    g.add_argument("--lr-decay-iters", type=int, help="default --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0, help="0 disables clipping")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 master weights)")
    g.add_argument("--fp16", action="store_true", help="not supported: use --bf16")
    g.add_argument("--recompute-activations", action="store_true")
    g.add_argument("--recompute-granularity", choices=["full", "selective"])
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", help="prefix, or weight prefix weight prefix ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--mock-data", action="store_true")
    g.add_argument("--data-loss-mask", action="store_true",
                   help="each sample's loss mask also the corpus's own per token (<prefix>_loss_mask.bin/.idx, "
                   "preprocess_data.py --loss-mask-key): a position counts where its label is a target")  # fmt: skip
    g.add_argument("--data-cache-path")
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES)
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    g.add_argument("--vocab-size", type=int, help="NullTokenizer vocabulary size")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save")
    g.add_argument("--load")
    g.add_argument("--save-interval", type=int)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; restart at iteration 0")
    g.add_argument("--exit-interval", type=int, help="stop (and save) once the iteration is a multiple of N")
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGTERM/SIGINT, finish the current iteration, save (every rank agrees) and exit 0",
    )
    g.add_argument(
        "--override-opt_param-scheduler",
        action="store_true",
        help="on resume, take the LR schedule (--lr, --min-lr, warm-up, decay) from the flags, not the checkpoint",
    )
    g.add_argument(
        "--use-checkpoint-opt_param-scheduler",
        action="store_true",
        help="on resume, take the LR schedule from the checkpoint, whatever the flags say",
    )
    g.add_argument("--dry-run", action="store_true", help="check and build everything, then stop before iteration 1")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir")
    g.add_argument("--log-jsonl", help="append one JSON object per logged iteration")
    g.add_argument("--no-progress-bar", action="store_true")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument(
        "--pipeline-split",
        choices=["cost", "uniform"],
        default="cost",
        help="stage boundaries: balance layer + head costs (default), or equal layer counts (Megatron)",
    )
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument(
        "--use-torch-fsdp2",
        action="store_true",
        help="data parallelism through FSDP2 fully_shard: parameters, gradients and optimizer state sharded over DP",
    )
    g.add_argument(
        "--ddp-bucket-size",
        type=int,
        help="elements per data-parallel gradient all-reduce bucket (default: 25 MB worth)",
    )
    g.add_argument(
        "--check-replicated-params",
        action="store_true",
        help="after every step, verify replicated parameters are bit-identical across ranks (debug)",
    )


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def _positive(args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if value is not None and value <= 0:
        raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def validate_args(
    args: argparse.Namespace, checkpoint_config: ModelConfig | None = None, data_parallel_size: int = 1
) -> None:
    """Check every flag; raise ValueError naming the first bad one. Fills derived defaults."""
    check_ranges(args)
    _validate_device(args.device)
    validate_output_paths(args)
    if args.fp16:
        raise ValueError("--fp16 is not supported: use --bf16")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    if args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler:
        raise ValueError("--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other")
    if args.sequence_parallel:
        if args.tensor_model_parallel_size == 1:
            raise ValueError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        if args.seq_length is not None and args.seq_length % args.tensor_model_parallel_size:
            raise ValueError("--sequence-parallel needs --seq-length divisible by --tensor-model-parallel-size")
        if args.tune_exit:
            raise ValueError("--sequence-parallel is not supported with --tune-exit")
    if args.use_torch_fsdp2 and (args.use_distributed_optimizer or args.tune_exit):
        raise ValueError(
            "--use-torch-fsdp2 shards the optimizer itself and trains everything: drop "
            + ("--use-distributed-optimizer" if args.use_distributed_optimizer else "--tune-exit")
        )
    if args.train_iters is None:
        raise ValueError("--train-iters is required")
    if args.seq_length is None:
        if checkpoint_config is None:
            raise ValueError("--seq-length is required")
        args.seq_length = checkpoint_config.max_position_embeddings
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * data_parallel_size):
        raise ValueError(
            f"--global-batch-size ({args.global_batch_size}) must be divisible by "
            f"--micro-batch-size ({args.micro_batch_size}) x data-parallel size ({data_parallel_size})"
        )
    if args.lr_warmup_fraction is not None:
        args.lr_warmup_iters = int(args.lr_warmup_fraction * args.train_iters)
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.save_interval is not None and not args.save:
        raise ValueError("--save-interval needs --save DIR")
    _validate_data_args(args)
    _validate_exit_args(args, checkpoint_config)
    _validate_tune_args(args, checkpoint_config)


# Every numeric flag's range, checked in one place: (flags, test, what the test means).
_INT_RANGES = [
    (
        ("micro_batch_size", "global_batch_size", "train_iters", "log_interval", "eval_iters", "save_interval",
         "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "kv_channels",
         "seq_length", "max_position_embeddings", "make_vocab_size_divisible_by", "vocab_size", "exit_interval",
         "tensor_model_parallel_size", "pipeline_model_parallel_size", "tune_exit_pipeline_parallel_size",
         "lr_decay_iters"),
        lambda v: v > 0,
        "> 0",
    ),
    (
        ("eval_interval", "lr_warmup_iters", "exit_layer_weight_warmup_iters", "num_workers",
         "num_fill_warmup_microbatches", "num_fill_cooldown_microbatches", "layer_dropout_warmup_iters"),
        lambda v: v >= 0,
        ">= 0",
    ),
    (("seed",), lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    (("exit_loss_rotation_size",), lambda v: v > 0, "> 0"),
]  # fmt: skip
_FLOAT_RANGES = [
    (("lr", "norm_epsilon", "rotary_base", "init_method_std", "adam_eps", "kd_temperature"), lambda v: v > 0, "> 0"),
    (("min_lr", "weight_decay", "clip_grad"), lambda v: v >= 0, ">= 0 (finite)"),
    (("hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("lr_warmup_fraction",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("exit_layer_weight", "exit_layer_weight_init"), lambda v: v >= 0, ">= 0 (finite)"),
    (("exit_layer_temperature",), lambda v: v > 0, "> 0 (finite)"),
    (("layer_dropout_max",), lambda v: 0 <= v < 1, "in [0, 1)"),
]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-").replace("-opt-param-", "-opt_param-")


# tools/generate.py's flags.
GENERATE_RANGES = [
    (
        (
            "max_new_tokens",
            "num_draft_tokens",
            "min_exit_layer",
            "draft_exit_layer",
            "exit_layers",
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
        ),
        lambda v: v > 0,
        "> 0",
    ),
    (("top_k", "stop_token_id"), lambda v: v >= 0, ">= 0"),
    (("seed",), lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
    (("temperature",), lambda v: v >= 0, ">= 0 (finite; 0 is greedy)"),
    (("top_p",), lambda v: 0 < v <= 1, "in (0, 1]"),
]  # fmt: skip  (the engine checks the rest: --early-exit-thres, --exit-layers against the model)


def check_ranges(args: argparse.Namespace, table: list | None = None) -> None:
    """Every numeric flag within its range (floats also finite); ValueError naming the first one outside.
    `table` defaults to the trainer's flags; tools pass their own (e.g. GENERATE_RANGES)."""
    import math

    for names, ok, what in table if table is not None else _INT_RANGES + _FLOAT_RANGES:
        for name in names:
            value = getattr(args, name, None)
            for v in value if isinstance(value, list) else [value]:
                if v is None or v == "auto":  # a word some flags take (checked where it is read)
                    continue
                if isinstance(v, float) and not math.isfinite(v) or not ok(v):
                    raise ValueError(f"{_flag(name)} must be {what}, got {v}")


def _validate_device(name: str) -> None:
    import torch

    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device: unknown device {name!r} (cpu, cuda, cuda:N or auto)") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name}: only cpu, cuda, cuda:N and auto are supported")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _check_writable_dir(flag: str, path: str) -> None:
    """`path` is, or can be created as, a writable directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path}: exists and is not a directory")
    existing = _nearest_existing(path)
    if not os.path.isdir(existing):
        raise ValueError(f"{flag} {path}: cannot be created, {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")


def validate_output_paths(args: argparse.Namespace) -> None:
    """--save, --tensorboard-dir and --log-jsonl are usable before any work starts."""
    if args.save:
        _check_writable_dir("--save", args.save)
    if args.tensorboard_dir:
        _check_writable_dir("--tensorboard-dir", args.tensorboard_dir)
    if args.log_jsonl:
        path = args.log_jsonl
        if os.path.isdir(path):
            raise ValueError(f"--log-jsonl {path}: is a directory")
        if os.path.exists(path) and not os.access(path, os.W_OK):
            raise ValueError(f"--log-jsonl {path}: not writable")
        _check_writable_dir("--log-jsonl", os.path.dirname(os.path.abspath(path)))


def _validate_data_args(args: argparse.Namespace) -> None:
    if getattr(args, "exit_activation_cache", None) and getattr(args, "data_loss_mask", False):
        raise ValueError(
            "--data-loss-mask: the activation cache holds its loss mask (cache it with "
            "tools/checkpoint/cache_exit_activations.py --data-loss-mask)"
        )
    if getattr(args, "exit_activation_cache", None) or getattr(args, "exit_candidate_vocab", None):
        from megatron.early_exit.training.cached_tuning import validate_cache_args

        return validate_cache_args(args)  # the cache replaces --data-path
    if args.mock_data and args.data_path:
        raise ValueError("--mock-data and --data-path are mutually exclusive")
    if args.mock_data and getattr(args, "data_loss_mask", False):
        raise ValueError("--data-loss-mask needs --data-path (a corpus with its loss mask), not --mock-data")
    if not args.mock_data and not args.data_path:
        raise ValueError("give --data-path PREFIX (see tools/preprocess_data.py) or --mock-data")
    if args.tokenizer_type == "NullTokenizer" and args.vocab_size is None:
        raise ValueError("--tokenizer-type NullTokenizer needs --vocab-size")
    for flag in ("vocab_file", "merge_file", "tokenizer_model"):
        path = getattr(args, flag)
        if path is not None and not os.path.exists(path):
            raise ValueError(f"--{flag.replace('_', '-')}: no such file: {path}")
    from megatron.early_exit.data.datasets import validate_split

    validate_split(args.split)


def _validate_exit_args(args: argparse.Namespace, ckpt: ModelConfig | None) -> None:
    nums = args.exit_layer_nums if args.exit_layer_nums is not None else (ckpt.exit_layer_nums if ckpt else [])
    n = len(nums)
    for flag in ("exit_layer_weight", "exit_layer_weight_init", "exit_layer_temperature"):
        values = getattr(args, flag)
        if values is not None and len(values) != n:
            raise ValueError(
                f"--{flag.replace('_', '-')} has {len(values)} values but there are {n} exits "
                f"(--exit-layer-nums {' '.join(map(str, nums)) or '<none>'})"
            )
    if args.exit_layer_weight_init is not None and args.exit_layer_weight_warmup_iters == 0:
        raise ValueError("--exit-layer-weight-init needs --exit-layer-weight-warmup-iters > 0")
    if args.fill_explicit_bubbles:
        _validate_fill_args(args, n)
    elif args.num_fill_warmup_microbatches or args.num_fill_cooldown_microbatches:
        raise ValueError("--num-fill-warmup-microbatches/--num-fill-cooldown-microbatches need --fill-explicit-bubbles")
    if args.use_dynamic_exit_layer_weight and n == 0:
        raise ValueError("--use-dynamic-exit-layer-weight needs exits (--exit-layer-nums)")
    if (args.use_exit_norm or args.use_exit_mlp or args.use_exit_block or args.pre_exit) and n == 0:
        raise ValueError("exit options given but no --exit-layer-nums")
    probes = args.use_exit_confidence_head or (ckpt is not None and ckpt.use_exit_confidence_head)
    if args.exit_confidence_input is not None and not probes:
        raise ValueError("--exit-confidence-input needs --use-exit-confidence-head")
    k = args.exit_confidence_hidden_size
    if k is not None and not 0 <= k <= 65536:
        raise ValueError(f"--exit-confidence-hidden-size must be in 0..65536, got {k}")
    if k and not probes:
        raise ValueError("--exit-confidence-hidden-size needs --use-exit-confidence-head")
    if getattr(args, "layer_dropout_max", 0.0) and args.tune_exit:
        raise ValueError("--layer-dropout-max trains the backbone: not with --tune-exit")
    if getattr(args, "layer_dropout_curriculum", "none") == "linear" and not args.layer_dropout_warmup_iters:
        raise ValueError("--layer-dropout-curriculum linear needs --layer-dropout-warmup-iters > 0")
    if getattr(args, "exit_loss_curriculum", "none") == "rotational" and n == 0:
        raise ValueError("--exit-loss-curriculum rotational needs exits (--exit-layer-nums)")


def _validate_fill_args(args: argparse.Namespace, num_exits: int) -> None:
    """--fill-explicit-bubbles: the 1F1B schedule runs the fills (one stage runs them in sequence,
    the objective the pipelined runs are checked against); the EE-Tuning schedule never does."""
    if num_exits == 0:
        raise ValueError("--fill-explicit-bubbles needs exits (--exit-layer-nums)")
    if args.tune_exit:
        raise ValueError(
            "--fill-explicit-bubbles does nothing with --tune-exit (its forward-only schedule runs no fills)"
        )
    if args.num_fill_warmup_microbatches is None:
        args.num_fill_warmup_microbatches = 1
    if args.num_fill_warmup_microbatches == 0 and args.num_fill_cooldown_microbatches == 0:
        raise ValueError(
            "--fill-explicit-bubbles with --num-fill-warmup-microbatches 0 and --num-fill-cooldown-microbatches 0 "
            "fills nothing"
        )


def _validate_tune_args(args: argparse.Namespace, ckpt: ModelConfig | None) -> None:
    if getattr(args, "tune_exit_confidence_only", False):
        if not args.tune_exit:
            raise ValueError("--tune-exit-confidence-only needs --tune-exit")
        if not (args.use_exit_confidence_head or (ckpt is not None and ckpt.use_exit_confidence_head)):
            raise ValueError(
                "--tune-exit-confidence-only: the exits in --load have no confidence probes "
                "(tools/checkpoint/add_exits.py --use-exit-confidence-head)"
            )
    if not args.tune_exit:
        if args.exit_loss_type != "ce" or args.tune_exit_pipeline_parallel_size is not None:
            raise ValueError("--exit-loss-type and --tune-exit-pipeline-parallel-size need --tune-exit")
        return
    if ckpt is None:
        raise ValueError("--tune-exit needs --load DIR with a checkpoint (see tools/checkpoint/add_exits.py)")
    if not ckpt.exit_layer_nums:
        raise ValueError(
            "--tune-exit: the checkpoint in --load has no exits; add them with tools/checkpoint/add_exits.py"
        )
    if args.tune_exit_pipeline_parallel_size is not None:
        if args.pipeline_model_parallel_size not in (1, args.tune_exit_pipeline_parallel_size):
            raise ValueError("--tune-exit-pipeline-parallel-size conflicts with --pipeline-model-parallel-size")
        args.pipeline_model_parallel_size = args.tune_exit_pipeline_parallel_size


def model_config_from_args(args: argparse.Namespace, vocab_size: int) -> ModelConfig:
    """Build a fresh model's config from flags (no checkpoint). `vocab_size` is the tokenizer's."""
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if getattr(args, name) is None:
            raise ValueError(f"--{name.replace('_', '-')} is required when not loading a checkpoint")
    if args.kv_channels is None and args.hidden_size % args.num_attention_heads:
        raise ValueError(
            f"--hidden-size ({args.hidden_size}) must be divisible by --num-attention-heads "
            f"({args.num_attention_heads}), or give --kv-channels"
        )
    llama = args.normalization == "RMSNorm"
    cfg = ModelConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        vocab_size=pad_vocab_size(vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size),
        real_vocab_size=vocab_size,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        normalization=args.normalization or "LayerNorm",
        norm_epsilon=args.norm_epsilon if args.norm_epsilon is not None else (1e-6 if llama else 1e-5),
        swiglu=bool(args.swiglu),
        position_embedding_type=args.position_embedding_type or "learned_absolute",
        rotary_base=args.rotary_base or 10000.0,
        add_bias_linear=not args.disable_bias_linear,
        untie_embeddings_and_output_weights=bool(args.untie_embeddings_and_output_weights),
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        exit_layer_nums=args.exit_layer_nums or [],
        pre_exit=bool(args.pre_exit),
        use_exit_norm=bool(args.use_exit_norm),
        use_exit_mlp=bool(args.use_exit_mlp),
        use_exit_block=bool(args.use_exit_block),
        untie_exit_output_weights=bool(args.untie_exit_output_weights),
        exit_layer_temperature=args.exit_layer_temperature or [],
        use_exit_confidence_head=bool(args.use_exit_confidence_head),
        exit_confidence_input=args.exit_confidence_input or "exit",
        exit_confidence_hidden_size=args.exit_confidence_hidden_size or 0,
    )
    cfg.validate()
    if args.seq_length > cfg.max_position_embeddings:
        raise ValueError(
            f"--seq-length ({args.seq_length}) exceeds --max-position-embeddings ({cfg.max_position_embeddings})"
        )
    return cfg


def check_against_checkpoint(args: argparse.Namespace, ckpt: ModelConfig) -> None:
    """Model flags given together with --load must match the checkpoint's config."""
    for name, flag in MODEL_FLAGS.items():
        given = getattr(args, name, None)
        if given is None:
            continue
        saved = getattr(ckpt, name)
        if isinstance(saved, bool):
            mismatch = bool(given) and not saved
        else:
            mismatch = given != saved
        if mismatch:
            raise ValueError(f"{flag} {given} does not match the checkpoint in --load (which has {saved})")
    if args.seq_length is not None and args.seq_length > ckpt.max_position_embeddings:
        raise ValueError(
            f"--seq-length ({args.seq_length}) exceeds the checkpoint's max position embeddings "
            f"({ckpt.max_position_embeddings})"
        )


def exit_loss_config_from_args(args: argparse.Namespace, num_exits: int) -> ExitLossConfig:
    weights = args.exit_layer_weight or [1.0] * num_exits
    if len(weights) != num_exits:
        raise ValueError(f"--exit-layer-weight has {len(weights)} values for {num_exits} exits")
    return ExitLossConfig(
        exit_layer_weight=list(weights),
        exit_layer_weight_init=list(args.exit_layer_weight_init or []),
        exit_layer_weight_warmup_iters=args.exit_layer_weight_warmup_iters,
        exit_layer_weight_warmup_style=args.exit_layer_weight_warmup_style,
        use_dynamic_exit_layer_weight=args.use_dynamic_exit_layer_weight,
    )
