"""Tensor parallelism equals the single-process model: losses of every head and gradients."""

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model import EarlyExitGPT
from tests.distributed import run_distributed

LLAMA = dict(
    normalization="RMSNorm",
    swiglu=True,
    position_embedding_type="rope",
    add_bias_linear=False,
    num_query_groups=2,
    untie_embeddings_and_output_weights=True,
)
GPT2 = dict()


def build(family, untie_exits):
    cfg = ModelConfig(
        num_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=128,
        max_position_embeddings=16,
        ffn_hidden_size=64,
        exit_layer_nums=[1, 2],
        use_exit_norm=True,
        use_exit_mlp=True,
        untie_exit_output_weights=untie_exits,
        **family,
    )
    model = EarlyExitGPT(cfg)
    model.init_weights(seed=3)
    return model


def losses_and_grads(model, ids, labels):
    out = model(ids, labels=labels, return_exit_confidences=True)
    heads = {"final": out.loss, **{n: v for n, v in out.exit_losses.items()}}
    total = sum(v.mean() for v in heads.values())
    total.backward()
    return {k: v.detach() for k, v in heads.items()}, {k: v.exit_confidences for k, v in [("c", out)]}["c"]


def _tp_worker(rank, world, family, untie_exits, ids, labels):
    import torch.distributed as dist

    from megatron.early_exit.parallel.tensor_parallel import apply_tensor_parallel, gather_full

    model = build(family, untie_exits)
    group = dist.new_group(list(range(world)))
    apply_tensor_parallel(model, group)
    losses, conf = losses_and_grads(model, ids, labels)
    grads = {n: gather_full(n, p.grad, model.config, group) for n, p in model.named_parameters()}
    logits = model(ids).logits
    return losses, conf, grads, logits


@pytest.mark.parametrize("family", [LLAMA, GPT2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("untie_exits", [False, True], ids=["tied-exits", "untied-exits"])
def test_tp2_equals_single_process(family, untie_exits):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    labels = torch.randint(0, 128, (2, 12), generator=g)
    ref = build(family, untie_exits)
    ref_losses, ref_conf = losses_and_grads(ref, ids, labels)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    ref_logits = ref(ids).logits
    for losses, conf, grads, logits in run_distributed(_tp_worker, 2, family, untie_exits, ids, labels):
        # fp32; sharded matmuls sum in a different order: round-off only (1e-5 relative).
        for k in ref_losses:
            torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-5, atol=1e-6)
        for k in ref_conf:
            torch.testing.assert_close(conf[k], ref_conf[k], rtol=1e-5, atol=1e-6)
        assert set(grads) == set(ref_grads)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-6, msg=n)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
