#!/usr/bin/env bash
# EE-LLM's way on a CPU budget: pretrain a small early-exit model (about 21M parameters, 8k
# SentencePiece vocabulary so that exit heads stay cheap) on the aclsum corpus, with exits
# after layers 3 and 6 trained jointly from the start. About an hour on 2 cores (bf16; estimated
# from the demo's measured speed, ~6 s per iteration).
# Then sweep early-exit thresholds on the aclsum summarisation set:
#   bash examples/ee_training/cpu_pretrain_aclsum.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/aclsum}
RUN=${RUN:-runs/ee_aclsum}
[ -f "$DATA/tokenizer.model" ] || python tools/prepare_aclsum_corpus.py --output "$DATA" --sentencepiece-vocab-size 8000
[ -f "$DATA/aclsum_text_document.bin" ] || python tools/preprocess_data.py --input "$DATA/train.jsonl" \
    --output-prefix "$DATA/aclsum" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --append-eod --workers 2
python pretrain_early_exit_gpt.py \
    --data-path "$DATA/aclsum_text_document" --split 98,2,0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --num-layers 10 --hidden-size 384 --num-attention-heads 6 --ffn-hidden-size 1024 \
    --seq-length 256 --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
    --exit-layer-nums 3 6 --exit-layer-weight 0.3 0.5 --use-exit-norm --use-exit-mlp \
    --micro-batch-size 8 --global-batch-size 16 --train-iters 500 \
    --lr 1.5e-3 --min-lr 1.5e-4 --lr-warmup-iters 40 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 \
    --bf16 --log-interval 20 --eval-interval 100 --eval-iters 5 \
    --save "$RUN/checkpoints" --save-interval 100 --log-jsonl "$RUN/log.jsonl" --tensorboard-dir "$RUN/tb" "$@"
python tools/eval/ee_sweep.py --load "$RUN/checkpoints" --data "$DATA/test_summarization.jsonl" \
    --output "$RUN/sweep" --num-examples 40 --bf16
python benchmarks/decode_speed.py --load "$RUN/checkpoints" --batch 1 8
