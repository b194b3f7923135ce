"""lm-eval's command line with the `megatron-ee` model registered (lm-eval reads no plugin entry
points, so its plain `lm_eval` command cannot see models outside its own package).

    python -m megatron.early_exit.eval --model megatron-ee \\
        --model_args load=CKPT,strategy=early_exit,threshold=0.8 \\
        --include_path tools/eval/lm_eval_tasks --tasks aclsum_mini --batch_size 8
"""

from lm_eval.__main__ import cli_evaluate

import megatron.early_exit.eval.lm_eval_model  # noqa: F401  (registers "megatron-ee")


def main() -> None:
    """The `lm-eval-ee` console script."""
    cli_evaluate()


if __name__ == "__main__":
    main()
