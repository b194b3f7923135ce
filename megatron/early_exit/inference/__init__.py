"""Early-exit generation: KV cache, batched per-sequence exits, self-speculation."""

from megatron.early_exit.inference.engine import (
    STRATEGIES,
    EarlyExitEngine,
    GenerationResult,
    GenerationSettings,
)


def generate(model, tokenizer, prompts, **settings):
    """Decode `prompts` (lists of token ids) as one batch; keyword arguments are GenerationSettings fields."""
    return EarlyExitEngine(model, tokenizer).generate(prompts, GenerationSettings(**settings))


__all__ = ["EarlyExitEngine", "GenerationResult", "GenerationSettings", "STRATEGIES", "generate"]
