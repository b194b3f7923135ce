#!/usr/bin/env bash
# A small early-exit GPT with pipeline parallelism on one CPU machine (gloo), 2 processes.
# Exits after layers 2 and 4 both live on the first stage: their compute fills the bubbles
# that stage would otherwise spend waiting in the 1F1B schedule (EE-LLM).
# Data: the aclsum corpus tokenized with its 8k SentencePiece model, as `make demo` makes it
# (data/aclsum/aclsum_text_document.{bin,idx} + data/aclsum/tokenizer.model); DATA=dir overrides.
#   bash examples/ee_training/cpu_pp2_tp1.sh [extra flags]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/aclsum}
[ -f "$DATA/aclsum_text_document.bin" ] || { echo "no $DATA/aclsum_text_document.bin: run 'make demo' first" >&2; exit 2; }
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
torchrun --nproc-per-node 2 pretrain_early_exit_gpt.py \
    --pipeline-model-parallel-size 2 --tensor-model-parallel-size 1 \
    --data-path "$DATA/aclsum_text_document" --split 98,2,0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --num-layers 8 --hidden-size 256 --num-attention-heads 8 --seq-length 256 \
    --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
    --exit-layer-nums 2 4 --exit-layer-weight 0.25 0.5 --use-exit-norm \
    --micro-batch-size 4 --global-batch-size 32 --train-iters 200 \
    --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 20 --lr-decay-style cosine --clip-grad 1.0 --bf16 \
    --log-interval 10 --eval-interval 100 --eval-iters 5 \
    --save "${RUN:-runs/cpu_pp2}/checkpoints" --save-interval 100 --device cpu "$@"
