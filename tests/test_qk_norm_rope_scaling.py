"""QK-norm and scaled RoPE in the model itself: tensor parallelism and KV-cached decoding
give the single-process, full-forward result (transformers parity is in test_conversion_families)."""

from __future__ import annotations

import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model import EarlyExitGPT
from tests.distributed import run_distributed

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "attention_factor": 1.2}


def build() -> EarlyExitGPT:
    cfg = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=128,
        real_vocab_size=100,
        max_position_embeddings=32,
        normalization="RMSNorm",
        swiglu=True,
        position_embedding_type="rope",
        add_bias_linear=False,
        qk_layernorm=True,
        rope_scaling=YARN,
        exit_layer_nums=[1],
        use_exit_norm=True,
    )
    model = EarlyExitGPT(cfg)
    model.init_weights(seed=5)
    with torch.no_grad():  # QK-norm weights away from ones, so a skipped norm would show
        for layer in model.decoder.layers.values():
            layer.self_attention.q_layernorm.weight.uniform_(0.5, 1.5)
            layer.self_attention.k_layernorm.weight.uniform_(0.5, 1.5)
    return model.eval()


def _tp_logits(rank, world, ids):
    import torch.distributed as dist

    from megatron.early_exit.parallel.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    model = build()
    apply_tensor_parallel(model, dist.new_group(list(range(world))))
    with torch.no_grad():
        out = model(ids)
    return out.logits, out.exit_logits[1]


def test_tp2_forward_equals_single_process():
    ids = torch.randint(0, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = build()
    with torch.no_grad():
        out = ref(ids)
    for logits, exit_logits in run_distributed(_tp_logits, 2, ids):
        # fp32; sharded matmuls sum in another order: round-off only
        torch.testing.assert_close(logits, out.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exit_logits, out.exit_logits[1], rtol=1e-5, atol=1e-5)


def _tp_grads(rank, world, ids):
    import torch.distributed as dist

    from megatron.early_exit.parallel.dims import ParallelDims, ParallelState
    from megatron.early_exit.parallel.grads import sync_gradients
    from megatron.early_exit.parallel.tensor_parallel import apply_tensor_parallel

    torch.manual_seed(0)
    model = build().train()
    group = dist.new_group(list(range(world)))
    apply_tensor_parallel(model, group)
    out = model(ids[:, :-1], labels=ids[:, 1:])
    (out.loss.mean() + out.exit_losses[1].mean()).backward()
    ps = ParallelState(ParallelDims(world, world, 1), rank, 0, 0, rank, group, None, None, [rank], torch.device("cpu"))
    sync_gradients(model, ps, None)
    return {n: p.grad.clone() for n, p in model.named_parameters() if "layernorm" in n}


def test_tp2_qk_norm_gradients_equal_single_process():
    """Each TP rank holds half of the heads, so its QK-norm gradient is half of the sum: the
    TP all-reduce of those replicated weights must make it whole (without SP too)."""
    ids = torch.randint(0, 100, (2, 21), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    ref = build().train()
    out = ref(ids[:, :-1], labels=ids[:, 1:])
    (out.loss.mean() + out.exit_losses[1].mean()).backward()
    expected = {n: p.grad for n, p in ref.named_parameters() if "layernorm" in n}
    assert any(".q_layernorm." in n for n in expected)
    for grads in run_distributed(_tp_grads, 2, ids):
        assert grads.keys() == expected.keys()
        for name, g in grads.items():
            # fp32; sharded matmuls and the all-reduce sum in another order: round-off only
            torch.testing.assert_close(g, expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_cached_decoding_equals_full_forward():
    from megatron.early_exit.inference import generate

    torch.manual_seed(0)
    model = build()
    prompt = [3, 14, 15, 92, 65, 35]

    class Ids:  # a tokenizer over ids, with an end-of-document id greedy decoding never picks here
        vocab_size, eod, bos, chat_template = 100, 99, None, None

        def tokenize(self, text):
            return []

        def detokenize(self, ids):
            return " ".join(map(str, ids))

    got = generate(model, Ids(), [prompt], strategy="full", max_new_tokens=12)[0].tokens
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(len(got)):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt) :]
