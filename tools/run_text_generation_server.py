#!/usr/bin/env python
"""Serve an early-exit model over REST (Megatron's PUT /api and OpenAI-compatible endpoints).

    python tools/run_text_generation_server.py --load runs/demo/checkpoints --port 5000
    curl -X PUT localhost:5000/api -H 'Content-Type: application/json' \\
        -d '{"prompts": ["Early exit"], "tokens_to_generate": 32, "temperature": 0, "use_early_exit": true,
             "early_exit_thres": 0.8}'

--load takes one of our checkpoints, a Hugging Face model directory or a GGUF file (converted
on the fly). Endpoints: PUT /api, POST /v1/completions, POST /v1/chat/completions,
GET /v1/models, GET /health, GET /metrics, GET /docs (OpenAPI). Requests that arrive
together are decoded together (continuous batching, up to --max-batch-size sequences).

Tensor and pipeline parallelism: `torchrun --nproc-per-node N tools/run_text_generation_server.py
--load CKPT --tensor-model-parallel-size T --pipeline-model-parallel-size P` with N = T x P:
rank 0 serves HTTP and broadcasts every engine call, the other ranks replay them (--load must
then be one of our checkpoints; convert HF/GGUF models first). With P > 1 requests are decoded
batch at a time (EE-LLM's pipeline early exit runs its own generation loop): requests with equal
settings share a batch, new ones wait for the running batch, a streamed request gets its whole
text when its batch ends, and self_speculative decoding, prompt scoring and top logprobs are
refused (400). SIGINT or SIGTERM (to torchrun, or to rank 0) stops every rank.
Errors in the arguments are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.early_exit.arguments import OneLineErrorParser, run_tool  # noqa: E402

DEFAULT_MAX_SEQ = 2048  # the KV cache's length when the model allows more (memory grows with it)


# Upper bounds that keep a typo from allocating the machine away (the KV cache is
# batch x sequence x layers) or from hanging the start; generous for real use.
RANGES = {
    "max_batch_size": (1, 1024),
    "max_queued_requests": (1, 1_000_000),
    "max_seq_length": (2, 1_048_576),
    "max_prompt_tokens": (1, 1_048_576),
    "max_new_tokens": (1, 1_048_576),
    "max_body_bytes": (1024, 1 << 31),
    "num_threads": (1, 1024),
    "port": (0, 65535),
    "tensor_model_parallel_size": (1, 1024),
    "pipeline_model_parallel_size": (1, 1024),
}
DEFAULT_MAX_BODY = 16 << 20  # bytes; 128 prompts of 2048 tokens as JSON are ~2 MB


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(name_prog=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint directory, HF model directory or .gguf file")
    p.add_argument("--loader", choices=("ee", "hf", "gguf"), help="format of --load (default: detected)")
    p.add_argument("--plugin", action="append", default=[], help="import a module that registers strategies/measures")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--api-key", default=os.environ.get("EE_SERVER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $EE_SERVER_API_KEY, else none)")  # fmt: skip
    p.add_argument("--model-name", help="the model id the OpenAI endpoints report (default: --load's name)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queued-requests", type=int, default=64, help="waiting requests before answering 503")
    p.add_argument("--max-seq-length", type=int, help=f"prompt + new tokens per sequence (default: the model's "
                   f"positions, at most {DEFAULT_MAX_SEQ})")  # fmt: skip
    p.add_argument("--max-prompt-tokens", type=int, help="default: --max-seq-length - 1")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="most tokens one request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY, help="largest request body (413 above)")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:0")
    p.add_argument("--bf16", action="store_true", help="load the weights in bfloat16")
    p.add_argument("--num-threads", type=int, help="torch CPU threads")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def check_args(args) -> None:
    """Every flag's range, before anything is loaded; a ValueError names the flag."""
    for name, (low, high) in RANGES.items():
        value = getattr(args, name)
        if value is not None and not low <= value <= high:
            raise ValueError(f"--{name.replace('_', '-')} must be in {low}..{high}, got {value}")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty (or $EE_SERVER_API_KEY is set but empty): give a key or unset it")
    if args.model_name is not None and not args.model_name.strip():
        raise ValueError("--model-name is empty")
    if not args.load.strip():
        raise ValueError("--load is empty")
    if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", args.device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.max_seq_length is not None and args.max_prompt_tokens is not None:
        check_prompt_room(args.max_prompt_tokens, args.max_seq_length)
    _check_world(args)


def check_prompt_room(max_prompt: int, max_seq: int) -> None:
    if max_prompt > max_seq:
        raise ValueError(f"--max-prompt-tokens {max_prompt} exceeds --max-seq-length {max_seq}")


def _check_world(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world != tp * pp:
        raise ValueError(
            f"--tensor-model-parallel-size ({tp}) x --pipeline-model-parallel-size ({pp}) must equal the number "
            f"of processes ({world}): the ranks serve one model together (no data parallelism)"
        )


def validate(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and range-check the flags without loading anything: a bad flag is one line on
    stderr and exit code 2 (what `main` does before loading)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def pick_device(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def load(args, device, tp: int):
    """(model, tokenizer) on `device`, its vocabulary padded for `tp` shards."""
    import torch

    from megatron.early_exit.conversion import load_model

    dtype = torch.bfloat16 if args.bf16 else None
    try:
        model, tokenizer, _ = load_model(args.load, args.loader, dtype, tensor_parallel_size=tp)
    except ValueError as e:  # the converters name their own tool's flag (--load-dir)
        raise ValueError(str(e).replace("--load-dir", "--load")) from None
    if tokenizer is None:
        raise ValueError(f"--load {args.load}: the checkpoint has no tokenizer")
    return model.to(device).eval(), tokenizer


def max_seq_length(args, model) -> int:
    positions = model.config.max_position_embeddings
    max_seq = args.max_seq_length or min(positions, DEFAULT_MAX_SEQ)
    if max_seq > positions:
        raise ValueError(f"--max-seq-length {max_seq} exceeds the model's {positions} positions")
    if args.max_prompt_tokens is not None:
        check_prompt_room(args.max_prompt_tokens, max_seq)
    return max_seq


def build(args, model, tokenizer, driver):
    """The scheduler and the app around a loaded model (rank 0): continuous batching over the
    step API, or batch at a time for the pipeline engine (which has its own generation loop)."""
    from megatron.early_exit.inference.server import BatchScheduler, Context, Limits, Metrics, Scheduler, create_app

    max_seq = max_seq_length(args, model)
    limits = Limits(
        max_prompt_tokens=args.max_prompt_tokens or max_seq - 1,
        max_new_tokens=args.max_new_tokens,
        max_seq_length=max_seq,
        max_batch_size=args.max_batch_size,
    )
    metrics = Metrics(model.config.num_layers)
    batched = args.pipeline_model_parallel_size > 1
    if batched:
        scheduler = BatchScheduler(driver, args.max_batch_size, args.max_queued_requests, metrics)
    else:  # +1: self-speculative verification may feed one position past the last kept token
        scheduler = Scheduler(driver, args.max_batch_size, max_seq + 1, args.max_queued_requests, metrics)
    name = args.model_name or os.path.basename(os.path.normpath(args.load))
    ctx = Context(driver.engine, tokenizer, limits, name, batch_at_a_time=batched)
    return scheduler, create_app(scheduler, ctx, metrics, args.api_key, args.max_body_bytes)


def load_parallel(args, device):
    """(model, tokenizer, engine, broadcast group) for this rank's stage / TP shard: every rank
    holds its part (inference/parallel.py) and makes the same engine calls."""
    import torch

    from megatron.early_exit.inference.parallel import load_stage, make_engine
    from megatron.early_exit.parallel.dims import initialize

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    pstate = initialize(tp, pp, device)
    model, tokenizer, specs = load_stage(args.load, pstate, torch.bfloat16 if args.bf16 else None)
    # Under PP every rank (each stage, each TP rank in it) takes part in `generate`: the world group.
    group = pstate.tp_group if pp == 1 else None
    return model, tokenizer, make_engine(model, tokenizer, pstate, specs), group


def run(args) -> None:
    import torch

    from megatron.early_exit.inference import EarlyExitEngine, load_plugins
    from megatron.early_exit.inference.server import EngineDriver, follow

    load_plugins(args.plugin)  # on every rank, before any request names what they register
    check_args(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    device = pick_device(args.device)
    parallel = args.tensor_model_parallel_size * args.pipeline_model_parallel_size > 1
    if parallel:
        model, tokenizer, engine, group = load_parallel(args, device)
    else:
        model, tokenizer = load(args, device, 1)
        engine, group = EarlyExitEngine(model, tokenizer), None
        engine.exit_costs()  # cost_aware's cost measurement now, not in the first request that uses it
        engine.chosen_head()  # and the greedy head's choice (timed where 'auto' may take the int8 head)
        start = time.perf_counter()  # and self-speculation's round costs, at every batch bucket it may run at
        if timed := engine.draft_costs(args.max_batch_size):
            between = " (the batch sizes between priced on the line between them)" if len(timed) > 1 else ""
            print(f"self-speculative round costs timed at batch {' and '.join(map(str, timed))} in "
                  f"{time.perf_counter() - start:.0f} s{between}", flush=True)  # fmt: skip
    if tokenizer is None:
        raise ValueError(f"--load {args.load}: the checkpoint has no tokenizer")
    max_seq_length(args, model)  # every rank checks, before followers start waiting for rank 0
    driver = EngineDriver(engine, group=group)
    if parallel and torch.distributed.get_rank() != 0:
        follow(driver)  # until rank 0 shuts down
        return
    serve(args, model, tokenizer, driver)


def serve(args, model, tokenizer, driver) -> None:
    """Rank 0: HTTP until SIGINT/SIGTERM, then stop the scheduler, which releases the followers."""
    import uvicorn

    scheduler, app = build(args, model, tokenizer, driver)
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal. Under the
    # default SIGTERM action the process would die at once, skipping the `finally` below and
    # leaving the followers waiting; make both signals an orderly exit instead.
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _exit_quietly)
        scheduler.start()
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=3)
    finally:
        scheduler.stop()  # also releases the follower ranks


def _exit_quietly(signum: int, frame) -> None:
    raise SystemExit(0)


def main(argv=None) -> None:
    args = validate(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_tool(run, args)


if __name__ == "__main__":
    main()
