#!/usr/bin/env python
"""Train an early-exit GPT (EE-LLM) or tune the exits of a pretrained one (EE-Tuning).

    python pretrain_early_exit_gpt.py --mock-data --tokenizer-type NullTokenizer --vocab-size 128 \
        --num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \
        --micro-batch-size 2 --global-batch-size 4 --train-iters 30 --lr 1e-3 \
        --exit-layer-nums 1 2 --exit-layer-weight 0.5 0.5 --log-interval 5

Flags follow Megatron-LM / EE-LLM; `--help` lists them.
"""

from megatron.early_exit.training.trainer import main

if __name__ == "__main__":
    main()
