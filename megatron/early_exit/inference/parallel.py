"""Decoding on a parallel layout: building this rank's part of the model, and the engine for it.

Tensor parallelism needs nothing of its own at decode time: `EarlyExitEngine` runs on a
TP-sharded model (`parallel.tensor_parallel.apply_tensor_parallel`) as it is. Its KV cache
holds this rank's query groups only (`passes.local_kv_groups`), and every head's logits are
all-gathered over TP before confidence and sampling (`HeadOps.full_logits`, the identity on
one device), while `learned` probes are replicated. Every input a decision depends on is then
the same on every TP rank, so every TP rank that makes the same engine calls with the same
arguments gets the same tokens, exit layers and confidences. That is what a server relies
on: rank 0 broadcasts each call and the other ranks replay it.

Pipeline parallelism uses `PipelineEngine` (inference/pipeline.py); TP inside each stage
composes with it (messages go between the ranks of equal TP rank).

    pstate = initialize(tp, pp, device)                     # parallel.dims
    model, tokenizer, specs = load_stage(path, pstate)
    results = make_engine(model, tokenizer, pstate, specs).generate(prompts, settings)
"""

from __future__ import annotations

import torch

from megatron.early_exit import checkpointing as ckpt
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference.engine import EarlyExitEngine
from megatron.early_exit.inference.pipeline import PipelineEngine
from megatron.early_exit.model.gpt import EarlyExitGPT
from megatron.early_exit.parallel.dims import ParallelState
from megatron.early_exit.parallel.pipeline import StageSpec, stages_for
from megatron.early_exit.parallel.tensor_parallel import apply_tensor_parallel


def build_stage(
    config: ModelConfig,
    pstate: ParallelState,
    weights: dict[str, torch.Tensor] | None = None,
    source: str = "",
    seed: int = 0,
    dtype: torch.dtype | None = None,
) -> tuple[EarlyExitGPT, list[StageSpec]]:
    """This rank's pipeline stage (as training builds it: `stages_for`'s balanced split),
    with full `weights` (or `init_weights(seed)`), sharded over TP; returns (model, every
    stage's spec)."""
    c = config
    pstate.dims.validate_model(c.num_layers, c.num_attention_heads, c.num_query_groups, c.ffn_hidden_size, c.vocab_size)
    specs = stages_for(config, pstate.dims.pp)
    spec = specs[pstate.pp_rank]
    model = EarlyExitGPT(config, spec.pre_process, spec.post_process, spec.layer_range)
    if weights is None:
        model.init_weights(seed)
    else:
        missing = ckpt.load_weights_into(model, weights, source, strict=False)
        if missing:
            raise ValueError(f"--load: checkpoint {source} lacks {missing[:5]}")
    model = model.to(device=pstate.device, dtype=dtype) if dtype is not None else model.to(pstate.device)
    apply_tensor_parallel(model, pstate.tp_group)
    return model.eval(), specs


def load_stage(path: str, pstate: ParallelState, dtype: torch.dtype | None = None):
    """A checkpoint (any saved layout) as this rank's stage: returns (model, tokenizer, specs)."""
    meta = ckpt.read_meta(path)
    weights = ckpt.read_weights(meta.directory)
    model, specs = build_stage(meta.model_config, pstate, weights, meta.directory, dtype=dtype)
    return model, ckpt.load_tokenizer_from(meta), specs


def make_engine(model: EarlyExitGPT, tokenizer, pstate: ParallelState, specs: list[StageSpec]) -> EarlyExitEngine:
    """The engine for this layout: `PipelineEngine` with more than one stage, else the plain
    engine (which runs TP-sharded models as they are)."""
    if pstate.dims.pp > 1:
        return PipelineEngine(model, pstate, specs, tokenizer)
    return EarlyExitEngine(model, tokenizer)
