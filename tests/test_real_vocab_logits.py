"""Logits users see cover the tokenizer's real vocabulary, not the padded embedding rows.

Megatron pads the vocabulary (50,257 -> 50,304 for GPT-2) so that TP shards are equal; the
padded rows still get logits (zero rows give 0, trained ones anything), so a user's own
log-softmax over them differs from the server's, which normalises over the real vocabulary.
"""

from __future__ import annotations

import torch

from megatron.early_exit import load_checkpoint
from megatron.early_exit.checkpointing import save_checkpoint
from megatron.early_exit.config import ModelConfig
from megatron.early_exit.model import EarlyExitGPT
from megatron.early_exit.tokenizer import build_tokenizer

REAL, PADDED = 300, 384


def _model() -> EarlyExitGPT:
    config = ModelConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        vocab_size=PADDED,
        real_vocab_size=REAL,
        max_position_embeddings=16,
        exit_layer_nums=[1],
        use_exit_norm=True,
    )
    model = EarlyExitGPT(config)
    model.init_weights(3)  # random padded rows too: their logits are as large as real ones
    return model.eval()


def test_logits_have_the_real_vocabulary(tmp_path):
    model = _model()
    ids = torch.randint(0, REAL, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(ids)
        h = model(ids, compute_final=False).hidden_states
        padded = model.head_ops.project(model.decoder.final_layernorm(h), model.output_weight())
    assert out.logits.shape == (2, 9, REAL) and out.exit_logits[1].shape == (2, 9, REAL)
    assert padded.shape[-1] == PADDED and torch.equal(out.logits, padded[..., :REAL])
    # the padded rows would have shifted a user's log-softmax by a visible amount
    shift = (torch.log_softmax(padded, -1)[..., :REAL] - torch.log_softmax(out.logits, -1)).abs().max().item()
    assert shift > 1e-3

    save_checkpoint(str(tmp_path / "ck"), 1, model, build_tokenizer("NullTokenizer", vocab_size=REAL - 1))
    loaded, tok = load_checkpoint(str(tmp_path / "ck"))
    with torch.no_grad():
        again = loaded(ids)
    assert tok.vocab_size == REAL and again.logits.shape[-1] == REAL and again.exit_logits[1].shape[-1] == REAL
    assert torch.equal(again.logits, out.logits)


def test_training_loss_keeps_the_padded_head():
    """With labels the loss is over the padded head, as vocab-parallel cross-entropy computes it."""
    model = _model().train()
    ids = torch.randint(0, REAL, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    h = model(ids, compute_final=False).hidden_states
    padded = model.head_ops.project(model.decoder.final_layernorm(h), model.output_weight())
    ref = torch.nn.functional.cross_entropy(padded.reshape(-1, PADDED), ids.reshape(-1), reduction="none")
    assert torch.allclose(out.loss.reshape(-1), ref, atol=1e-6)
