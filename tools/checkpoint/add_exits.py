#!/usr/bin/env python
"""EE-Tuning stage 1: add exit heads to a checkpoint.

    python tools/checkpoint/add_exits.py --load-dir ckpt/ --save-dir ckpt_exits/ \\
        --add-exit-layer-nums 8 16 24 --use-exit-norm --use-exit-mlp

Copy initialisation (default): exit norm <- final norm; exit MLP and its norm <- the MLP and
pre-MLP norm of the exit's own layer; exit block <- the last layer; untied exit output <-
the output layer (or the word embedding when tied); confidence head <- zeros (an MLP probe,
--exit-confidence-hidden-size K: its first layer N(0, std), its last zeros); the probe norm of
--exit-confidence-input backbone <- the final norm.
--random-init: norm weights ones, biases zeros, other matrices N(0, --init-method-std).
Existing exits are kept (adding one at a layer that has an exit is an error); with existing
exits the structure flags must match theirs. Saves our format (iteration 0, tokenizer kept).
--load-dir may also be an HF directory or a .gguf file (converted on the way).

--replace-probes (instead of, or besides, new exits) gives every exit a new probe of the shape
--exit-confidence-hidden-size (and --exit-confidence-input) asks for, initialised as above:

    python tools/checkpoint/add_exits.py --load-dir ckpt/ --save-dir ckpt_mlp/ \
        --replace-probes --exit-confidence-hidden-size 128

--untie-exits gives every existing exit an output projection of its own, copied from the one it
shares (the model's outputs are unchanged until tuning moves it; then distil it from the final
head: `--exit-loss-type kd`).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Add exit heads to a checkpoint (EE-Tuning stage 1).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    p.add_argument("--load-dir", required=True, help="ee checkpoint, HF model directory or .gguf file")
    p.add_argument("--save-dir", required=True, help="output ee checkpoint directory")
    p.add_argument("--loader", choices=("ee", "hf", "gguf"), default=None, help="input format (default: detected)")
    p.add_argument("--add-exit-layer-nums", type=int, nargs="+", default=None, help="1-based layers to add exits after")
    flag = dict(action="store_true", default=None)
    p.add_argument("--use-exit-norm", **flag, help="exit has a norm before its output projection")
    p.add_argument("--use-exit-mlp", **flag, help="exit has a residual MLP")
    p.add_argument("--use-exit-block", **flag, help="exit has a whole transformer layer")
    p.add_argument("--untie-exit-output-weights", **flag, help="exit has its own output projection")
    p.add_argument("--use-exit-confidence-head", **flag, help="exit has a learned confidence probe")
    p.add_argument(
        "--exit-confidence-input",
        choices=("exit", "backbone"),
        default=None,
        help="what the probe reads: the exit's hidden state (default) or the backbone's through the "
        "probe's own norm (copied from the final norm)",
    )
    p.add_argument(
        "--exit-confidence-hidden-size",
        type=int,
        default=None,
        help="the probe's shape: 0 = one linear map, K > 0 = Linear(hidden, K) -> GELU -> Linear(K, 1)",
    )
    p.add_argument(
        "--replace-probes",
        action="store_true",
        help="give every exit (existing and new) a new probe of the shape the probe flags ask for",
    )
    p.add_argument(
        "--untie-exits",
        action="store_true",
        help="give every existing exit an output projection of its own, copied from the one it shares",
    )
    p.add_argument("--exit-layer-temperature", type=float, default=1.0, help="temperature of the new exits")
    p.add_argument("--random-init", action="store_true", help="random instead of copy initialisation")
    p.add_argument("--init-method-std", type=float, default=None, help="std of --random-init (default: the model's)")
    p.add_argument("--seed", type=int, default=1234, help="seed for --random-init")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="dtype of the saved weights (default: kept)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a --save-dir that is not empty (default: refuse, so an existing run is never replaced)",
    )
    return p


def run(args: argparse.Namespace) -> str:
    from megatron.early_exit.checkpointing import check_target, save_checkpoint
    from megatron.early_exit.conversion import ConversionError, load_model, parse_dtype, replace_probes, untie_exits

    if os.path.abspath(args.save_dir) == os.path.abspath(args.load_dir):
        raise ConversionError("--save-dir must differ from --load-dir")
    if args.init_method_std is not None and not (args.random_init or args.exit_confidence_hidden_size):
        raise ConversionError("--init-method-std only applies with --random-init or --exit-confidence-hidden-size")
    if not args.add_exit_layer_nums and not args.replace_probes and not args.untie_exits:
        raise ConversionError("give --add-exit-layer-nums, --replace-probes, --untie-exits or several")
    if args.untie_exits and args.add_exit_layer_nums:
        raise ConversionError("--untie-exits unties existing exits: add new ones with --untie-exit-output-weights")
    check_target(args.save_dir, args.overwrite)
    model, tokenizer, _ = load_model(args.load_dir, args.loader)
    before = list(model.config.exit_layer_nums)
    if args.add_exit_layer_nums:
        model = _add(model, args)
    if args.replace_probes:
        model = replace_probes(
            model,
            args.exit_confidence_hidden_size or 0,
            exit_confidence_input=args.exit_confidence_input,
            init_method_std=args.init_method_std,
            seed=args.seed,
        )
    if args.untie_exits:
        model = untie_exits(model)
    dtype = parse_dtype(args.dtype)
    if dtype is not None:
        model = model.to(dtype)
    record = {
        "added_exit_layer_nums": sorted(args.add_exit_layer_nums or []),
        "replaced_probes": bool(args.replace_probes),
        "untied_exits": bool(args.untie_exits),
        "init": "random" if args.random_init else "copy",
        "source": os.path.abspath(args.load_dir),
    }
    out = save_checkpoint(args.save_dir, 0, model, tokenizer, args=record)
    print(f"exits {before} -> {_describe(model.config, args)}; saved to {out}", file=sys.stderr)
    return out


def _add(model, args: argparse.Namespace):
    from megatron.early_exit.conversion import add_exits

    return add_exits(
        model,
        args.add_exit_layer_nums,
        use_exit_norm=args.use_exit_norm,
        use_exit_mlp=args.use_exit_mlp,
        use_exit_block=args.use_exit_block,
        untie_exit_output_weights=args.untie_exit_output_weights,
        use_exit_confidence_head=args.use_exit_confidence_head,
        exit_confidence_input=args.exit_confidence_input,
        exit_confidence_hidden_size=None if args.replace_probes else args.exit_confidence_hidden_size,
        random_init=args.random_init,
        init_method_std=args.init_method_std,
        seed=args.seed,
        temperature=args.exit_layer_temperature,
    )


def _describe(c, args: argparse.Namespace) -> str:
    structure = [k for k in ("norm", "mlp", "block") if getattr(c, f"use_exit_{k}")]
    k = c.exit_confidence_hidden_size
    probe = f"{f'MLP ({k})' if k else 'linear'} probes read the {c.exit_confidence_input} state, "
    return (
        f"{c.exit_layer_nums} ({'+'.join(structure) or 'projection only'}, "
        f"{'untied' if c.untie_exit_output_weights else 'tied'} output, "
        f"{probe if c.use_exit_confidence_head else ''}"
        f"{'random' if args.random_init else 'copy'} init)"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
    try:
        run(args)
    except (ValueError, OSError) as e:
        print(f"add_exits.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
