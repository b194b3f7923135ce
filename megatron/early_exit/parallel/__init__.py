"""Process groups, tensor-parallel layers and pipeline communication (applied from outside the model)."""
