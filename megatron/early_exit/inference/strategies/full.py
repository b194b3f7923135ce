"""`full`: the final head for every token."""

from megatron.early_exit.inference.strategies.base import Strategy


class Full(Strategy):
    name = "full"
    pipeline = True
