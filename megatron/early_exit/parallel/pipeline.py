"""Pipeline parallelism: splitting the model into stages, and moving activations between them.

`split_stages` is a pure function (tested on its own): it cuts the layers into contiguous
stages so that the most expensive stage is as cheap as possible, counting each stage's
layers, the exit heads that live on it and, on the last stage, the final head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron.early_exit.config import ModelConfig


@dataclass(frozen=True)
class StageSpec:
    index: int
    layer_range: tuple[int, int]  # 0-based [start, end)
    pre_process: bool
    post_process: bool


def head_cost(config: ModelConfig) -> float:
    """Cost of a vocabulary head relative to one transformer layer (per-token matmul FLOPs:
    2*h*V against about 2*(4h^2 attention + 3 or 2 * h * ffn MLP))."""
    h, ffn = config.hidden_size, int(config.ffn_hidden_size)
    mlp = (3 if config.swiglu else 2) * h * ffn
    layer = 4 * h * h + mlp
    return (h * config.vocab_size) / layer


def exit_cost(config: ModelConfig) -> float:
    cost = head_cost(config)
    if config.use_exit_mlp:
        h, ffn = config.hidden_size, int(config.ffn_hidden_size)
        cost += ((3 if config.swiglu else 2) * h * ffn) / (4 * h * h + (3 if config.swiglu else 2) * h * ffn)
    if config.use_exit_block:
        cost += 1.0
    return cost


def split_stages(
    num_layers: int,
    pp: int,
    exit_layers: list[int] | tuple[int, ...] = (),
    exit_cost: float = 0.0,
    final_cost: float = 0.0,
    uniform: bool = False,
) -> list[StageSpec]:
    """Contiguous layer ranges for `pp` stages, each with at least one layer.

    uniform=True: Megatron's even split (num_layers must divide). Otherwise minimise the
    largest stage cost, where a stage costs 1 per layer + `exit_cost` per exit whose layer
    (1-based) it holds + `final_cost` if it is the last stage; ties go to the earliest
    split, i.e. later stages get fewer layers.
    """
    if pp < 1 or num_layers < pp:
        raise ValueError(f"cannot split {num_layers} layers into {pp} pipeline stages")
    if uniform:
        if num_layers % pp:
            raise ValueError(f"--num-layers ({num_layers}) is not divisible by --pipeline-model-parallel-size ({pp})")
        per = num_layers // pp
        bounds = [(i * per, (i + 1) * per) for i in range(pp)]
    else:
        bounds = _balanced_bounds(num_layers, pp, set(exit_layers), exit_cost, final_cost)
    return [StageSpec(i, b, i == 0, i == pp - 1) for i, b in enumerate(bounds)]


def _balanced_bounds(num_layers, pp, exits, exit_cost, final_cost):
    def cost(start, end, last):
        c = (end - start) + exit_cost * sum(1 for n in exits if start < n <= end)
        return c + (final_cost if last else 0.0)

    inf = float("inf")
    # best[k][j]: minimal max-cost of splitting layers [0, j) into k stages.
    best = [[inf] * (num_layers + 1) for _ in range(pp + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for k in range(1, pp + 1):
        for j in range(k, num_layers + 1):
            for i in range(k - 1, j):
                value = max(best[k - 1][i], cost(i, j, k == pp and j == num_layers))
                if value < best[k][j] - 1e-12:
                    best[k][j], cut[k][j] = value, i
    bounds, j = [], num_layers
    for k in range(pp, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def stages_for(config: ModelConfig, pp: int, uniform: bool = False) -> list[StageSpec]:
    return split_stages(
        config.num_layers, pp, config.exit_layer_nums, exit_cost(config), head_cost(config), uniform=uniform
    )


def embedding_holders(config: ModelConfig, specs: list[StageSpec]) -> list[int]:
    """Stages that hold the word embedding: the first, plus any whose heads are tied to it."""
    holders = []
    for spec in specs:
        start, end = spec.layer_range
        has_tied_exit = not config.untie_exit_output_weights and any(start < n <= end for n in config.exit_layer_nums)
        tied_final = spec.post_process and not config.untie_embeddings_and_output_weights
        if spec.pre_process or has_tied_exit or tied_final:
            holders.append(spec.index)
    return holders


def p2p(send: torch.Tensor | None, send_to: int | None, recv_like: torch.Tensor | None, recv_from: int | None):
    """Send and/or receive one tensor with a neighbour stage, as one batched pair of
    non-blocking operations, so that two stages exchanging in opposite directions never
    deadlock. Returns the received tensor (or None)."""
    ops = []
    buf = None
    if send is not None and send_to is not None:
        ops.append(dist.P2POp(dist.isend, send.contiguous(), send_to))
    if recv_like is not None and recv_from is not None:
        buf = torch.empty_like(recv_like)
        ops.append(dist.P2POp(dist.irecv, buf, recv_from))
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()
    return buf
