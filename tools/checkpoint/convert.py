#!/usr/bin/env python
"""Convert checkpoints between Hugging Face, GGUF (llama.cpp) and our format.

    python tools/checkpoint/convert.py --loader hf   --saver ee --load-dir hf_llama/ --save-dir ckpt/
    python tools/checkpoint/convert.py --loader gguf --saver ee --load-dir model.gguf --save-dir ckpt/
    python tools/checkpoint/convert.py --loader ee   --saver hf --load-dir ckpt/ --save-dir hf_out/

Errors (bad paths, unsupported architectures, missing tensors, shape mismatches) are one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

EPILOG = """\
Our `ee` checkpoints store full, unsharded weights and load into any tensor/pipeline
parallel layout, so no resharding happens here: --target-tensor-parallel-size and
--target-pipeline-parallel-size are checked against the model (attention heads, query
groups, FFN size and the padded vocabulary divisible by TP; at least PP layers), the
vocabulary is padded to a multiple of 128 x TP as Megatron does, and the sizes are recorded
in the checkpoint's args. HF export (--saver hf) writes a directory `transformers` loads as
LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM / GPT2LMHeadModel, plus early_exit_heads.safetensors
and early_exit_config.json holding the exit heads, which `--loader hf` restores.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert checkpoints: HF / GGUF / ee -> ee / HF.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--loader",
        choices=("hf", "gguf", "ee"),
        default=None,
        help="input format (default: detected from --load-dir)",
    )
    p.add_argument("--saver", choices=("ee", "hf"), default="ee", help="output format (default: ee)")
    p.add_argument(
        "--load-dir", required=True, help="HF model directory, .gguf file (or its directory), or ee checkpoint"
    )
    p.add_argument("--save-dir", required=True, help="output directory")
    p.add_argument("--target-tensor-parallel-size", type=int, default=1, help="validated and recorded (see below)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=1, help="validated and recorded (see below)")
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="dtype of the saved weights (default fp32; GGUF files are dequantised)",
    )
    p.add_argument(
        "--iteration", type=int, default=None, help="iteration number for --saver ee (default: 0, or the source's)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a --save-dir that is not empty (default: refuse, so an existing run is never replaced)",
    )
    return p


def _one_line_warnings() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show


def _target_flags(message: str) -> str:
    """ParallelDims names the training flags; this tool's flags are the --target-* ones."""
    message = message.replace("--tensor-model-parallel-size", "--target-tensor-parallel-size")
    return message.replace("--pipeline-model-parallel-size", "--target-pipeline-parallel-size")


def convert(args: argparse.Namespace) -> str:
    from megatron.early_exit.checkpointing import check_target, save_checkpoint
    from megatron.early_exit.conversion import ConversionError, export_hf, load_model, parse_dtype
    from megatron.early_exit.parallel.dims import ParallelDims

    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    try:
        dims = ParallelDims(world_size=tp * pp, tp=tp, pp=pp)
    except ValueError as e:
        raise ConversionError(_target_flags(str(e))) from None
    if os.path.abspath(args.save_dir) == os.path.abspath(args.load_dir):
        raise ConversionError("--save-dir must differ from --load-dir")
    check_target(args.save_dir, args.overwrite)
    dtype = parse_dtype(args.dtype)
    start = time.time()
    model, tokenizer, iteration = load_model(args.load_dir, args.loader, tensor_parallel_size=tp)
    c = model.config
    try:
        dims.validate_model(
            c.num_layers, c.num_attention_heads, int(c.num_query_groups), int(c.ffn_hidden_size), c.vocab_size
        )
    except ValueError as e:
        raise ConversionError(_target_flags(str(e))) from None
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"loaded {args.load_dir}: {c.num_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads "
        f"({c.num_query_groups} groups), vocab {c.real_vocab_size} (padded {c.vocab_size}), exits {c.exit_layer_nums}, "
        f"{n_params / 1e6:.1f}M parameters in {time.time() - start:.1f}s",
        file=sys.stderr,
    )
    if tokenizer is None:
        print("warning: no tokenizer found; the checkpoint is saved without one", file=sys.stderr)
    model = model.to(dtype)
    if args.saver == "hf":
        out = export_hf(model, tokenizer, args.save_dir)
    else:
        it = args.iteration if args.iteration is not None else (iteration or 0)
        record = {
            "converted_from": os.path.abspath(args.load_dir),
            "loader": args.loader,
            "tensor_model_parallel_size": tp,
            "pipeline_model_parallel_size": pp,
            "dtype": args.dtype,
        }
        out = save_checkpoint(args.save_dir, it, model, tokenizer, args=record)
    print(f"saved {args.saver} checkpoint to {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _one_line_warnings()
    try:
        convert(args)
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"convert.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
