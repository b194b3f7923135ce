"""Evaluation integrations: lm-evaluation-harness (`lm_eval_model`, model `megatron-ee`).

python -m megatron.early_exit.eval --model megatron-ee --model_args load=CKPT,strategy=early_exit ...
"""
