"""The bucketed DP reducer (parallel/data_parallel.py) on 2 gloo processes: in a 1F1B order
(all forwards first, backwards later), gradients are reduced exactly once, after every
micro-batch has accumulated, partly during the last backward and the rest in finish()."""

from __future__ import annotations

import torch

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
