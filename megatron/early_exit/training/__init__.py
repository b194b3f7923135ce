"""Losses, optimizer, LR schedule and the training loop."""
