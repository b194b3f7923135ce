"""Pieces shared by the converters: errors, QKV layouts, vocabulary padding, dtypes.

Our attention keeps Q, K and V fused in one matrix in Megatron's *grouped* layout: for
each of the ng query groups, its nh/ng query heads, then the group's key head, then its
value head (hd rows each). Hugging Face keeps three matrices (Llama) or one [q; k; v]
matrix (GPT-2's c_attn); `fuse_qkv` / `split_qkv` move between the two.
"""

from __future__ import annotations

import torch

from megatron.early_exit.config import ModelConfig, pad_vocab_size

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ConversionError(ValueError):
    """A problem with the input (path, architecture, tensors): reported as one line, exit code 2."""


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConversionError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nh: int, ng: int, hd: int) -> torch.Tensor:
    """q [nh*hd, ...], k and v [ng*hd, ...] -> fused [(nh + 2 ng) hd, ...] in grouped order.

    Works for weights ([rows, in]) and biases ([rows]) alike.
    """
    tail = q.shape[1:]
    per = nh // ng
    qg = q.reshape(ng, per, hd, *tail)
    kg = k.reshape(ng, 1, hd, *tail)
    vg = v.reshape(ng, 1, hd, *tail)
    return torch.cat((qg, kg, vg), dim=1).reshape((nh + 2 * ng) * hd, *tail).contiguous()


def split_qkv(w: torch.Tensor, nh: int, ng: int, hd: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `fuse_qkv`: fused grouped rows -> q [nh*hd, ...], k, v [ng*hd, ...]."""
    tail = w.shape[1:]
    per = nh // ng
    g = w.reshape(ng, per + 2, hd, *tail)
    q = g[:, :per].reshape(nh * hd, *tail).contiguous()
    k = g[:, per].reshape(ng * hd, *tail).contiguous()
    v = g[:, per + 1].reshape(ng * hd, *tail).contiguous()
    return q, k, v


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows so that `t` has `rows` rows (the padded vocabulary)."""
    if t.shape[0] > rows:
        raise ConversionError(f"cannot pad {tuple(t.shape)} down to {rows} rows")
    if t.shape[0] == rows:
        return t
    pad = torch.zeros((rows - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat((t, pad), dim=0)


VOCAB_ROW_TENSORS = ("embedding.word_embeddings.weight", "output_layer.weight")


def is_vocab_tensor(name: str) -> bool:
    """Tensors whose rows are the (padded) vocabulary."""
    return name in VOCAB_ROW_TENSORS or (name.startswith("exits.") and name.endswith(".output_layer.weight"))


def repad_vocab(config: ModelConfig, weights: dict[str, torch.Tensor], new_size: int) -> None:
    """Change the padded vocabulary size in place (rows beyond the real vocabulary only)."""
    real = config.real_vocab_size or config.vocab_size
    if new_size < real:
        raise ConversionError(f"padded vocabulary {new_size} is smaller than the real vocabulary {real}")
    for name in list(weights):
        if is_vocab_tensor(name):
            weights[name] = pad_rows(weights[name][: min(new_size, weights[name].shape[0])], new_size)
    config.vocab_size = new_size


def padded_vocab(real_vocab_size: int, tensor_parallel_size: int = 1) -> int:
    """Megatron's rule: a multiple of 128 x TP."""
    return pad_vocab_size(real_vocab_size, 128, tensor_parallel_size)


def build_model(config: ModelConfig, weights: dict[str, torch.Tensor], source: str, dtype: torch.dtype | None = None):
    """An EarlyExitGPT (eval mode) holding `weights`; names and shapes are checked against the config."""
    from megatron.early_exit.checkpointing import load_weights_into
    from megatron.early_exit.model import EarlyExitGPT

    try:
        config.validate()
    except ValueError as e:
        raise ConversionError(f"{source}: unsupported model configuration: {e}") from None
    # Build on the meta device (no wasted random init of every matrix), then materialise.
    # Buffers that are not saved (RoPE's inv_freq) are computed at construction, so they are
    # rebuilt; if the model ever grows other unsaved buffers, fall back to a plain CPU build.
    with torch.device("meta"):
        model = EarlyExitGPT(config)
    saved = set(model.state_dict())
    unsaved = [n for n, _ in model.named_buffers() if n not in saved]
    if all(n.startswith("rotary.") for n in unsaved):
        model = model.to_empty(device="cpu")
        if model.rotary is not None:
            from megatron.early_exit.model.rotary import RotaryEmbedding

            model.rotary = RotaryEmbedding(config.head_dim, config.rotary_base, config.rope_scaling)
    else:
        model = EarlyExitGPT(config)
    if dtype is not None:
        model = model.to(dtype)
    try:
        load_weights_into(model, weights, source)
    except ValueError as e:
        raise ConversionError(str(e).removeprefix("--load: ")) from None
    model.eval()
    return model


def model_weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}
