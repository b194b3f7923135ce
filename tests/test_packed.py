"""The CPU decode fast path (oneDNN-prepacked weights) computes what the ordinary kernels do.

Tolerances: the packed kernels sum in a different order, so fp32 results differ by
round-off (~1e-6 relative here); bf16 by bf16 rounding of the output.
"""

import copy

import pytest
import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from megatron.early_exit.inference.packed import disable_packed_weights, enable_packed_weights, packing_available
from megatron.early_exit.model import EarlyExitGPT

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build lacks oneDNN")


@pytest.fixture(autouse=True)
def packed_kernel(monkeypatch):
    """These tests are about the packed kernels: force them (the suite's default is plain F.linear)."""
    monkeypatch.setenv("EE_LINEAR_KERNEL", "packed")


def tiny(**kw):
    cfg = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128,
                      vocab_size=96, max_position_embeddings=64, normalization="RMSNorm", swiglu=True,
                      position_embedding_type="rope", add_bias_linear=False, exit_layer_nums=[1, 2],
                      use_exit_norm=True, use_exit_mlp=True, **kw)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(0)
    return model.eval()


def test_packed_forward_equals_plain_and_follows_weight_updates():
    model = tiny(untie_embeddings_and_output_weights=True)
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
    assert enable_packed_weights(model)
    assert enable_packed_weights(model)  # idempotent
    with torch.no_grad():
        out = model(ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    for n in ref.exit_logits:
        torch.testing.assert_close(out.exit_logits[n], ref.exit_logits[n], rtol=1e-5, atol=1e-5)
    # An in-place update (as an optimizer step does) must be seen: the packed copy is remade.
    with torch.no_grad():
        model.decoder.layers["1"].mlp.linear_fc2.weight.mul_(3.0)
        model.output_layer.weight.add_(0.5)
        packed = model(ids).logits
    disable_packed_weights(model)
    with torch.no_grad():
        plain = model(ids).logits
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-5)
    assert (plain - ref.logits).abs().max() > 0.1  # the update really changed the output


def test_autograd_takes_the_ordinary_path_and_deepcopy_repacks():
    model = tiny()
    enable_packed_weights(model)
    ids = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    model.train()
    loss = model(ids).logits.float().logsumexp(-1).mean()
    loss.backward()  # would fail on the packed (no-autograd) kernels
    assert model.decoder.layers["0"].self_attention.linear_qkv.weight.grad is not None
    model.eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.decoder.layers["0"].self_attention.linear_qkv.weight.zero_()
        a, b = model(ids).logits, twin(ids).logits
    assert (a - b).abs().max() > 1e-3  # the copy uses its own (changed) weights, not the original's packs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_engine_with_packed_weights_decodes_like_plain(dtype):
    model = tiny().to(dtype)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    plain_model = copy.deepcopy(model)
    settings = GenerationSettings(max_new_tokens=8, ignore_eos=True, return_logprobs=True)
    packed = EarlyExitEngine(model).generate(prompts, settings)
    plain = EarlyExitEngine(plain_model, packed_weights=False).generate(prompts, settings)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for p, q in zip(packed, plain):
        assert p.tokens == q.tokens
        torch.testing.assert_close(torch.tensor(p.logprobs), torch.tensor(q.logprobs), rtol=tol, atol=tol)
    early = GenerationSettings(max_new_tokens=8, ignore_eos=True, strategy="early_exit", early_exit_threshold=0.0)
    assert [r.tokens for r in EarlyExitEngine(model).generate(prompts, early)] == [
        r.tokens for r in EarlyExitEngine(plain_model, packed_weights=False).generate(prompts, early)
    ]
