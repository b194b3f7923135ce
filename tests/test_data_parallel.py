"""The bucketed DP reducer (parallel/data_parallel.py) on 2 gloo processes: in a 1F1B order
(all forwards first, backwards later), gradients are reduced exactly once, after every
micro-batch has accumulated, partly during the last backward and the rest in finish().
FSDP2 with one unit per layer, driven the same way: every layer sharded on its own, gathered
only around its own forward and backward, gradients equal to the single process's."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron.early_exit.parallel.data_parallel import GradReducer
from tests.distributed import run_distributed


def _model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3))


def _data(rank: int, k: int) -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(10 * rank + k))


def _loss(model, x, k, num_micro):
    # The last micro-batch skips the first layer (like layer dropout), so its bucket, the
    # last in backward order, never becomes ready in the last backward.
    h = model[0](x) if k < num_micro - 1 else torch.cat([x, x[:, :2]], dim=1)
    return model[2](model[1](h)).pow(2).mean() / num_micro


def _reduce_in_1f1b_order(rank, world):
    model = _model()
    reducer = GradReducer(model, None, world, bucket_bytes=24 * 4)  # one Linear per bucket
    m = 3
    losses = [_loss(model, _data(rank, k), k, m) for k in range(m)]  # warm-up: forwards only
    losses[0].backward()
    losses[1].backward()
    with reducer.last_backward():
        losses[2].backward()
    launched_early = sum(b.handle is not None for b in reducer.buckets)
    reducer.finish()
    grads = [p.grad.clone() for p in model.parameters()]
    ref = _model()
    for r in range(world):
        for k in range(m):
            (_loss(ref, _data(r, k), k, m) / world).backward()
    # A second armed backward after a bucket was reduced is a schedule bug, caught loudly.
    losses = [_loss(model, _data(rank, k), k, m) for k in range(2)]
    losses[0].backward()
    with reducer.last_backward():
        losses[1].backward()
    try:
        with reducer.last_backward():
            _loss(model, _data(rank, 0), 0, m).backward()
        caught = False
    except RuntimeError:
        caught = True
    return grads, [p.grad for p in ref.parameters()], launched_early, len(reducer.buckets), caught


def test_reducer_reduces_once_after_every_micro_batch():
    for grads, ref, launched_early, buckets, caught in run_distributed(_reduce_in_1f1b_order, 2):
        # Same sums in another order: fp32 round-off only.
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-7)
        assert buckets == 3 and launched_early == 2  # the first Linear's bucket waits for finish()
        assert caught


# ----- FSDP2, one unit per layer ------------------------------------------------------------


def _tiny_gpt():
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model.gpt import EarlyExitGPT

    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=96, max_position_embeddings=16,
                      ffn_hidden_size=48, exit_layer_nums=[1], use_exit_norm=True)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(seed=5)
    return model


def _gpt_batch(rank: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(100 * rank + k))  # [b, s+1]
    return ids[:, :-1], ids[:, 1:]


def _gpt_forward(model, rank, k):
    """What the 1F1B schedule does: the stage's pieces, exits deferred to the backward."""
    from megatron.early_exit.model.gpt import ModelOutput

    ids, labels = _gpt_batch(rank, k)
    h, rotary = model.embed_input(ids, None, None)
    h, exit_inputs = model.run_layers(h, rotary)
    out = ModelOutput(hidden_states=h)
    model.final_head(out, h, labels)
    return out, exit_inputs, rotary, labels


def _gpt_loss(model, fwd, exits_only: bool, num_micro: int) -> torch.Tensor:
    out, exit_inputs, rotary, labels = fwd
    model.evaluate_exits(out, exit_inputs, rotary, labels)
    loss = 0.5 * out.exit_losses[1].mean()
    return (loss if exits_only else loss + out.loss.mean()) / num_micro


def _gathered(model) -> int:
    """Parameter elements this rank holds in full (FSDP2 registers sharded ones as DTensors)."""
    return sum(p.numel() for p in model.parameters() if not hasattr(p, "to_local"))


def _fsdp2_in_1f1b_order(rank, world, per_layer, recompute=False):
    import types

    from torch.distributed.fsdp import FSDPModule, fully_shard

    from megatron.early_exit.parallel.data_parallel import FSDP2, local

    model = _tiny_gpt()
    model.recompute_activations = recompute  # backward reruns each layer's forward: FSDP2 regathers it
    total = sum(p.numel() for p in model.parameters())
    root_numel = total - sum(p.numel() for p in model.decoder.layers.parameters())
    ps = types.SimpleNamespace(dp_group=dist.group.WORLD, device=torch.device("cpu"))
    engine = FSDP2(model, ps, per_layer=per_layer)
    layers = list(model.decoder.layers.values())
    root_state = fully_shard.state(model)
    units = [isinstance(layer, FSDPModule) and fully_shard.state(layer) is not root_state for layer in layers]
    m = 3  # the last micro-batch feeds the exit only (a fill micro-batch): its backward skips layers 1, 2
    fwds = [_gpt_forward(model, rank, k) for k in range(m)]  # warm-up: forwards only
    gathered_in_warmup = _gathered(model)
    for k in range(m):
        with engine.last_backward() if k == m - 1 else contextlib.nullcontext():
            _gpt_loss(model, fwds[k], k == m - 1, m).backward()
    engine.finish()
    held = sum(local(p).numel() for p in model.parameters())
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    ref = _tiny_gpt()
    for r in range(world):
        for k in range(m):
            (_gpt_loss(ref, _gpt_forward(ref, r, k), k == m - 1, m) / world).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    return units, gathered_in_warmup, root_numel, total, held, _gathered(model), grads, ref_grads


def test_fsdp2_shards_each_layer_and_reduces_once():
    for units, gathered, root_numel, total, held, gathered_after, grads, ref in run_distributed(
        _fsdp2_in_1f1b_order, 2, True
    ):
        assert units == [True, True, True]  # each layer its own unit, apart from the root
        # Three forwards done, no backward yet: only the root (embedding, exit, final norm) is
        # gathered; every layer went back to its shard after its forward.
        assert gathered == root_numel < total / 2
        # Between steps a rank holds half of every parameter (dim-0 shards; odd sizes round up).
        assert gathered_after == 0 and abs(held / total - 0.5) < 0.01
        assert grads.keys() == ref.keys()
        for name in ref:
            # Same sums in another order (per-rank accumulation, then a reduce-scatter): fp32 round-off.
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
        assert ref["decoder.layers.2.mlp.linear_fc1.weight"].abs().sum() > 0  # a real gradient


def test_fsdp2_one_unit_keeps_the_stage_gathered():
    # The contrast that makes the per-layer test meaningful: one unit gathers everything at once.
    for units, gathered, _, total, held, gathered_after, grads, ref in run_distributed(_fsdp2_in_1f1b_order, 2, False):
        assert units == [False, False, False] and gathered == total
        assert gathered_after == 0 and abs(held / total - 0.5) < 0.01
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fsdp2_per_layer_with_activation_recompute():
    for units, gathered, root_numel, *_, grads, ref in run_distributed(_fsdp2_in_1f1b_order, 2, True, True):
        assert units == [True, True, True] and gathered == root_numel
        for name in ref:
            torch.testing.assert_close(grads[name], ref[name], rtol=1e-5, atol=1e-7, msg=name)
