"""The model against hand computations: layers, exits, families, initialisation."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model import EarlyExitGPT

GPT2 = dict(normalization="LayerNorm", swiglu=False, position_embedding_type="learned_absolute", add_bias_linear=True)
LLAMA = dict(
    normalization="RMSNorm",
    swiglu=True,
    position_embedding_type="rope",
    add_bias_linear=False,
    num_query_groups=2,
    untie_embeddings_and_output_weights=True,
    norm_epsilon=1e-6,
)


def make(family, **kw) -> EarlyExitGPT:
    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=64, max_position_embeddings=16)
    base.update(family)
    base.update(kw)
    model = EarlyExitGPT(ModelConfig(**base))
    model.init_weights(seed=7)
    return model


# ----- an independent reference, written from the formulas --------------------------------


def ref_norm(model, norm, x):
    if model.config.normalization == "LayerNorm":
        return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, model.config.norm_epsilon)
    return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.config.norm_epsilon)


def ref_rope(x, pos, theta):
    """x [b, n, s, d]: rotate pairs (i, i + d/2) by pos * theta^(-2i/d)."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = (pos[:, None].double() * inv[None]).float()  # (s, d/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def ref_layer(model, layer, x):
    c = model.config
    b, s, _ = x.shape
    nh, ng, hd = c.num_attention_heads, c.num_query_groups, c.head_dim
    h = ref_norm(model, layer.input_layernorm, x)
    qkv = F.linear(h, layer.self_attention.linear_qkv.weight, layer.self_attention.linear_qkv.bias)
    qkv = qkv.view(b, s, ng, nh // ng + 2, hd)
    q = qkv[:, :, :, : nh // ng].reshape(b, s, nh, hd).transpose(1, 2)
    k = qkv[:, :, :, nh // ng].transpose(1, 2)
    v = qkv[:, :, :, nh // ng + 1].transpose(1, 2)
    if c.position_embedding_type == "rope":
        pos = torch.arange(s)
        q, k = ref_rope(q, pos, c.rotary_base), ref_rope(k, pos, c.rotary_base)
    k = k.repeat_interleave(nh // ng, dim=1)
    v = v.repeat_interleave(nh // ng, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, nh * hd)
    x = x + F.linear(att, layer.self_attention.linear_proj.weight, layer.self_attention.linear_proj.bias)
    h = ref_norm(model, layer.pre_mlp_layernorm, x)
    h = F.linear(h, layer.mlp.linear_fc1.weight, layer.mlp.linear_fc1.bias)
    if c.swiglu:
        g, u = h.chunk(2, -1)
        h = g * torch.sigmoid(g) * u
    else:
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h**3)))
    return x + F.linear(h, layer.mlp.linear_fc2.weight, layer.mlp.linear_fc2.bias)


def ref_forward(model, ids):
    """Hidden state after every layer (index 0 = embeddings) and the final logits."""
    x = model.embedding.word_embeddings.weight[ids]
    if model.embedding.position_embeddings is not None:
        x = x + model.embedding.position_embeddings.weight[: ids.shape[1]]
    hidden = [x]
    for i in range(model.config.num_layers):
        x = ref_layer(model, model.decoder.layers[str(i)], x)
        hidden.append(x)
    logits = ref_norm(model, model.decoder.final_layernorm, x) @ model.output_weight().t()
    return hidden, logits


@pytest.mark.parametrize("family", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_final_logits_match_reference(family):
    model = make(family)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    _, ref = ref_forward(model, ids)
    out = model(ids)
    # fp32 with differently ordered reductions (SDPA vs explicit softmax): round-off only.
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("pre_exit", [False, True])
def test_exit_logits_are_hand_computed_from_the_layer_hidden_state(family, pre_exit):
    model = make(family, exit_layer_nums=[1, 2], use_exit_norm=True, use_exit_mlp=True, pre_exit=pre_exit)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    hidden, _ = ref_forward(model, ids)
    out = model(ids)
    assert sorted(out.exit_logits) == [1, 2]
    for n in (1, 2):
        head = model.exits[str(n)]
        h = hidden[n - 1] if pre_exit else hidden[n]  # input of layer n, or its output
        h = h + F.linear(
            ref_mlp_act(
                model, F.linear(ref_norm(model, head.mlp_norm, h), head.mlp.linear_fc1.weight, head.mlp.linear_fc1.bias)
            ),
            head.mlp.linear_fc2.weight,
            head.mlp.linear_fc2.bias,
        )
        h = ref_norm(model, head.norm, h)
        expected = h @ model.embedding.word_embeddings.weight.t()  # tied exit output
        torch.testing.assert_close(out.exit_logits[n], expected, rtol=1e-5, atol=1e-5)


def ref_mlp_act(model, h):
    if model.config.swiglu:
        g, u = h.chunk(2, -1)
        return F.silu(g) * u
    return F.gelu(h, approximate="tanh")


def test_untied_exit_and_temperature():
    model = make(LLAMA, exit_layer_nums=[2], untie_exit_output_weights=True, exit_layer_temperature=[2.0])
    ids = torch.randint(0, 64, (1, 8))
    hidden, _ = ref_forward(model, ids)
    head = model.exits["2"]
    assert head.output_layer is not None and "exits.2.output_layer.weight" in dict(model.named_parameters())
    expected = hidden[2] @ head.output_layer.weight.t() / 2.0
    torch.testing.assert_close(model(ids).exit_logits[2], expected, rtol=1e-5, atol=1e-5)


def test_exit_block_is_a_transformer_layer():
    model = make(GPT2, exit_layer_nums=[1], use_exit_block=True, use_exit_norm=True)
    ids = torch.randint(0, 64, (2, 6))
    hidden, _ = ref_forward(model, ids)
    head = model.exits["1"]
    h = ref_norm(model, head.norm, ref_layer(model, head.block, hidden[1]))
    torch.testing.assert_close(
        model(ids).exit_logits[1], h @ model.embedding.word_embeddings.weight.t(), rtol=1e-5, atol=1e-5
    )


def test_losses_with_labels_are_per_token_cross_entropy():
    model = make(GPT2, exit_layer_nums=[1])
    ids = torch.randint(0, 64, (2, 8))
    labels = torch.randint(0, 64, (2, 8))
    logits = model(ids)
    out = model(ids, labels=labels, return_exit_confidences=True)
    assert out.logits is None and out.loss.shape == (2, 8)
    ce = F.cross_entropy(logits.logits.reshape(-1, 64), labels.reshape(-1), reduction="none").view(2, 8)
    torch.testing.assert_close(out.loss, ce)
    exit_probs = logits.exit_logits[1].softmax(-1)
    torch.testing.assert_close(out.exit_confidences[1], exit_probs.max(-1).values)


def test_init_is_deterministic_per_name_and_megatron_scaled():
    a, b = make(GPT2, num_layers=4), make(GPT2, num_layers=4)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
    # Output projections into the residual stream get std / sqrt(2 * layers).
    std = a.decoder.layers["0"].mlp.linear_fc2.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(8)) < 0.002
    assert abs(a.decoder.layers["0"].mlp.linear_fc1.weight.std().item() - 0.02) < 0.002
    assert torch.equal(a.decoder.layers["1"].input_layernorm.weight, torch.ones(32))
    # A stage holding only layers 2..3 has exactly the same tensors as the full model there.
    stage = EarlyExitGPT(a.config, pre_process=False, post_process=True, layer_range=(2, 4))
    stage.init_weights(seed=7)
    full = dict(a.named_parameters())
    for name, p in stage.named_parameters():
        assert torch.equal(p, full[name]), name


def test_bad_config_errors_name_the_flag():
    with pytest.raises(ValueError, match="--exit-layer-nums"):
        make(GPT2, exit_layer_nums=[4])
    with pytest.raises(ValueError, match="--num-query-groups"):
        make(LLAMA, num_query_groups=3)
    with pytest.raises(ValueError, match="--exit-layer-temperature"):
        make(GPT2, exit_layer_nums=[1, 2], exit_layer_temperature=[1.0])


def test_recompute_gives_same_gradients():
    model = make(LLAMA, exit_layer_nums=[1])
    ids = torch.randint(0, 64, (2, 8))

    def grads(recompute):
        model.zero_grad()
        model.recompute_activations = recompute
        out = model(ids, labels=ids)
        (out.loss.mean() + out.exit_losses[1].mean()).backward()
        return [p.grad.clone() for p in model.parameters()]

    for g1, g2 in zip(grads(False), grads(True)):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
