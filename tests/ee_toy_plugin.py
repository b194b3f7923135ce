"""A toy plugin for the registry tests (loaded with `--plugin ee_toy_plugin`, or imported).

- strategy `exit_at`: every generated token leaves at the first allowed exit (the request's
  `exit_layers` / `min_exit_layer`), whatever its confidence;
- measure `always_sure`: confidence 1.0 from the exit's hidden state alone (no vocabulary
  projection), so `early_exit` with it takes the first allowed exit at any threshold.
"""

import torch

from megatron.early_exit.inference import ExitPolicy, Measure, Strategy, register_measure, register_strategy


class ExitAt(Strategy):
    name = "exit_at"

    def policy(self, engine, s, allowed: list[int]) -> ExitPolicy:
        if not allowed:
            raise ValueError("exit_layers: exit_at needs an allowed exit")
        return ExitPolicy(force=allowed[0])


def always_sure(head, hidden: torch.Tensor) -> torch.Tensor:
    """exit hidden [A, 1, h] -> confidence [A], all 1.0."""
    return torch.ones(hidden.shape[0])


def register() -> None:
    register_strategy(ExitAt())
    register_measure(Measure("always_sure", needs_vocab=False, from_hidden=always_sure))


register()
