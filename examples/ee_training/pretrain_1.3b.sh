#!/usr/bin/env bash
# EE-LLM's 1.3B configuration: 24 layers, hidden 2048, 16 heads, exits after layers 6 and 12
# with loss weights 0.25 and 0.5 (tied exit heads with a norm). Multi-node torchrun:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 bash examples/ee_training/pretrain_1.3b.sh
# (run on every node with its NODE_RANK). DATA is a Megatron .bin/.idx prefix (or a blend).
set -euo pipefail
cd "$(dirname "$0")/../.."
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}; GPUS=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
TP=${TP:-1}; PP=${PP:-4}
SP=""; [ "$TP" -gt 1 ] && SP=--sequence-parallel  # sequence parallelism needs TP > 1
torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    pretrain_early_exit_gpt.py \
    --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" $SP \
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 \
    --max-position-embeddings 2048 --normalization RMSNorm --swiglu --position-embedding-type rope \
    --disable-bias-linear --untie-embeddings-and-output-weights \
    --exit-layer-nums 6 12 --exit-layer-weight 0.25 0.5 --use-exit-norm \
    --micro-batch-size 2 --global-batch-size 2048 --train-iters 300000 \
    --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 \
    --adam-beta2 0.95 --clip-grad 1.0 --bf16 --use-distributed-optimizer \
    --data-path "${DATA:?set DATA to a .bin/.idx prefix}" --split 990,9,1 \
    --tokenizer-type "${TOKENIZER_TYPE:-GPT2BPETokenizer}" \
    --log-interval 10 --eval-interval 1000 --eval-iters 10 \
    --save "${SAVE:-checkpoints/ee_1.3b}" --load "${SAVE:-checkpoints/ee_1.3b}" --save-interval 1000 \
    --tensorboard-dir "${SAVE:-checkpoints/ee_1.3b}/tensorboard" "$@"
