"""megatron-early-exit: early-exit LLMs (EE-LLM, EE-Tuning) on PyTorch, device-agnostic.

Lives next to megatron-core's `megatron.core` in the `megatron` namespace package.
"""

__version__ = "0.1.0"


def load_checkpoint(path, device="cpu", dtype=None):
    """Load a saved checkpoint onto one device: returns (model, tokenizer). See DESIGN.md 7."""
    from megatron.early_exit.checkpointing import load_checkpoint as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["load_checkpoint", "__version__"]
