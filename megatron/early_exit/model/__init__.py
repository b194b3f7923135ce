"""Device-agnostic early-exit GPT model code (no process groups in here)."""

from megatron.early_exit.model.gpt import EarlyExitGPT, ModelOutput, init_tensor, token_losses

__all__ = ["EarlyExitGPT", "ModelOutput", "init_tensor", "token_losses"]
