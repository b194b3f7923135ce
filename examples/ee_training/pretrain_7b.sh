#!/usr/bin/env bash
# EE-LLM's 7B configuration: 32 layers, hidden 4096, 32 heads, exits after layers 8 and 16
# with loss weights 0.1 and 0.2, untied exit output weights. Multi-node torchrun, as in
# pretrain_1.3b.sh (or submit with slurm_7b.sbatch).
set -euo pipefail
cd "$(dirname "$0")/../.."
NNODES=${NNODES:-4}; NODE_RANK=${NODE_RANK:-0}; GPUS=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-4}; PP=${PP:-4}
SP=""; [ "$TP" -gt 1 ] && SP=--sequence-parallel  # sequence parallelism needs TP > 1
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    pretrain_early_exit_gpt.py \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" $SP \
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --ffn-hidden-size 11008 \
    --seq-length 2048 --max-position-embeddings 2048 --normalization RMSNorm --swiglu \
    --position-embedding-type rope --disable-bias-linear --untie-embeddings-and-output-weights \
    --exit-layer-nums 8 16 --exit-layer-weight 0.1 0.2 --use-exit-norm --untie-exit-output-weights \
    --micro-batch-size 1 --global-batch-size 2048 --train-iters 300000 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 \
    --adam-beta2 0.95 --clip-grad 1.0 --bf16 --use-distributed-optimizer --recompute-activations \
    --data-path "${DATA:?set DATA to a .bin/.idx prefix}" --split 990,9,1 \
    --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}" \
    --log-interval 10 --eval-interval 1000 --eval-iters 10 \
    --save "${SAVE:-checkpoints/ee_7b}" --load "${SAVE:-checkpoints/ee_7b}" --save-interval 1000 \
    --tensorboard-dir "${SAVE:-checkpoints/ee_7b}/tensorboard" "$@"
