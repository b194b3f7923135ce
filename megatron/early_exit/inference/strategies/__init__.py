"""Decoding strategies behind one interface (`base.Strategy`), found by name in `STRATEGIES`.

Built in, in this order: `full`, `early_exit` (EE-LLM's pipeline early exit on the pipeline
engine) and `self_speculative`. A plugin registers its own with `register_strategy`.
"""

from megatron.early_exit.inference.strategies.base import (
    STRATEGIES,
    Batch,
    Strategy,
    get_strategy,
    register_strategy,
    strategy_names,
)
from megatron.early_exit.inference.strategies.early_exit import EarlyExit
from megatron.early_exit.inference.strategies.full import Full
from megatron.early_exit.inference.strategies.self_speculative import SelfSpeculative

for _builtin in (Full(), EarlyExit(), SelfSpeculative()):
    register_strategy(_builtin)

__all__ = ["STRATEGIES", "Batch", "Strategy", "get_strategy", "register_strategy", "strategy_names"]
