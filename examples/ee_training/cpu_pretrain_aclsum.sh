#!/usr/bin/env bash
# The CPU reference model: pretrain a small early-exit model (24M parameters, 12 layers, 8k
# SentencePiece vocabulary so that exit heads stay cheap) on the aclsum paper corpus (~1.5M
# tokens), tune its exits from cached activations, once more on its own answers (runs/ee_aclsum/distilled),
# then its probes alone on its answers' positions (runs/ee_aclsum/probes: the reference), calibrate its thresholds and sweep
# them. One command, about an hour and a quarter on 2 quiet cores with bf16 kernels (avx512_bf16 / AMX: ~1,600 tokens/s); ~3 hours on AVX2 alone (fp32,
# ~270 tokens/s: 15 s an iteration):
#   bash examples/ee_training/cpu_pretrain_aclsum.sh
# Its flags go to the pretraining: stopped, it resumes from the last checkpoint (saved every 50
# iterations), then runs the steps after it, with
#   bash examples/ee_training/cpu_pretrain_aclsum.sh --load runs/ee_aclsum/checkpoints
#
# What the first round's 23M model taught (its exits and its final head were nearly the same
# undertrained model, and layer counts alone could not buy much):
#   - exits at a quarter and a half of the depth (layers 3 and 6 of 12), norm-only so that an
#     exit costs one norm and the tied vocabulary projection, nothing more;
#   - a confidence probe per exit (--use-exit-confidence-head): a decoding step decides to exit
#     from the probe without a vocabulary projection;
#   - LayerSkip's recipe (arXiv 2404.16710): layer dropout rising with depth to 0.1, warmed up
#     linearly over the first 200 iterations, which teaches later layers to tolerate missing
#     inputs and earlier layers to carry the prediction;
#   - ~1.9 passes over the corpus (700 iterations x 16 x 256 tokens) instead of 1.3.
# What the second round added: MLP probes (PROBE_HIDDEN=128: Linear(384, 128) -> GELU ->
# Linear(128, 1)) put on the pretrained exits before EE-Tuning, which rank "exit agrees with the
# final head" better than the linear ones (PROBE_HIDDEN=0 keeps linear probes), and two passes
# over the cache instead of one, for the new probes to learn.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-data/aclsum}
RUN=${RUN:-runs/ee_aclsum}
# bf16 where the CPU has bf16 matrix kernels, else fp32 (megatron/early_exit/precision.py: on AVX2
# alone bf16 training is no faster and caching ~5x slower); BF16=--bf16 or BF16= forces either.
BF16=${BF16-$(python -m megatron.early_exit.precision)}
# the sweep decodes in bf16 wherever the native kernel is built; DECODE_DTYPE=fp32 forces fp32
DECODE_DTYPE=${DECODE_DTYPE:-$(python -m megatron.early_exit.precision --decode-dtype)}
[ -f "$DATA/tokenizer.model" ] || python tools/prepare_aclsum_corpus.py --output "$DATA" --sentencepiece-vocab-size 8000
[ -f "$DATA/aclsum_text_document.bin" ] || python tools/preprocess_data.py --input "$DATA/train.jsonl" \
    --output-prefix "$DATA/aclsum" --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --append-eod --workers 2
python pretrain_early_exit_gpt.py \
    --data-path "$DATA/aclsum_text_document" --split 98,2,0 \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model" \
    --num-layers 12 --hidden-size 384 --num-attention-heads 6 --ffn-hidden-size 1024 \
    --seq-length 256 --normalization RMSNorm --swiglu --position-embedding-type rope --disable-bias-linear \
    --exit-layer-nums 3 6 --exit-layer-weight 0.3 0.5 --use-exit-norm --use-exit-confidence-head \
    --layer-dropout-max 0.1 --layer-dropout-curriculum linear --layer-dropout-warmup-iters 200 \
    --micro-batch-size 8 --global-batch-size 16 --train-iters 700 \
    --lr 1.5e-3 --min-lr 1.5e-4 --lr-warmup-iters 60 --lr-decay-style cosine --clip-grad 1.0 --weight-decay 0.1 \
    $BF16 --log-interval 20 --eval-interval 200 --eval-iters 10 \
    --save "$RUN/checkpoints" --save-interval 50 --log-jsonl "$RUN/log.jsonl" --tensorboard-dir "$RUN/tb" "$@"
# Pretraining's probes learn "exit's top-1 == the label"; an exit decision needs "== the final
# head's". New probes of PROBE_HIDDEN units replace them (every other tensor kept), each exit gets
# an output projection of its own (--untie-exits: a copy of the tied one, so nothing changes yet),
# and a short EE-Tuning pass from cached activations (backbone frozen) distils the exits from the
# final head (--exit-loss-type kd) and trains the probes to that target. What the third round
# taught: a norm-only exit on the tied head has nothing but its norm's gains to tune (ce+kd left
# exit 3 at 76.7% agreement with the final head on the sweep's summaries); its own projection,
# distilled alone (cross-entropy on the labels pulled it away from the final head), reaches
# 82.0% after two passes over the cache (lr 3e-4: 81.2%, and the probes then sent 33% of tokens
# out at the calibrated thresholds instead of 39%; four passes: no more), and every point of exit
# 3's agreement is worth ~1.5% of self-speculation's speed. ~3 minutes on quiet cores.
python tools/checkpoint/add_exits.py --load-dir "$RUN/checkpoints" --save-dir "$RUN/probed" --overwrite \
    --replace-probes --exit-confidence-hidden-size "${PROBE_HIDDEN:-128}" --untie-exits
# The cached EE-Tuning pass, run twice (here, and on the model's own answers below):
#   cache_activations CHECKPOINT DATA_PREFIX MAX_TOKENS VALID_SAMPLES OUTPUT
#   tune_exits FROM CACHE ITERS LR MIN_LR SAVE LOG (kd from the cache, backbone frozen; two passes)
cache_activations() {
    python tools/checkpoint/cache_exit_activations.py --load "$1" --data-path "$2" \
        --split 98,2,0 --seq-length 256 --max-tokens "$3" --num-valid-samples "$4" --top-k 16 --dtype bf16 $BF16 \
        --output "$5" --no-progress-bar "${@:6}"
}
tune_exits() {
    python pretrain_early_exit_gpt.py --load "$1" --finetune --tune-exit --exit-activation-cache "$2" \
        --exit-loss-type kd --micro-batch-size 16 --global-batch-size 16 --train-iters "$3" \
        --lr "$4" --min-lr "$5" --lr-warmup-iters 10 --lr-decay-style cosine \
        $BF16 --log-interval 25 --eval-interval "$3" --eval-iters 4 --save "$6" --save-interval "$3" \
        --log-jsonl "$7"
}
cache_activations "$RUN/checkpoints" "$DATA/aclsum_text_document" "${CACHE_TOKENS:-600000}" 64 "$RUN/cache"
tune_exits "$RUN/probed" "$RUN/cache" 292 1e-3 1e-4 "$RUN/tuned" "$RUN/tune_log.jsonl"
# Thresholds with CALM's guarantee (disagreement with full decoding <= 5% with probability >= 90%),
# written into the checkpoint for `--early-exit-thres auto`. The validation part is 5 documents,
# 21,150 tokens: all of it, as 660 chunks of 32 tokens (more i.i.d. units than 165 of 128; the
# default WSR bound then proves a risk close to delta). Run for the distilled checkpoint too (below).
calibrate() {
    python tools/eval/calibrate_thresholds.py --load "$1" --delta 0.05 --epsilon 0.1 \
        --data-path "$DATA/aclsum_text_document" --split 98,2,0 --seq-length 32 --num-chunks 1000 \
        --measure learned $BF16 --check-splits 20
}
calibrate "$RUN/tuned"
# Self-distillation (README "Exits tuned on the model's own answers"): exits and probes tuned once
# more from the tuned checkpoint, on the model's own one-line answers (full greedy decoding) to
# prompts from the train/val papers, never the sweep's test abstracts. The probes learn when an
# exit agrees with the final head on the text they then decide on: along full decoding's
# summaries (stop 72, 40 abstracts, teacher-forced) their AUC rose from 0.752 / 0.699 to 0.814 /
# 0.762 at exits 3 / 6, the exits' agreement from 80.7 / 87.1% to 84.0 / 89.5%, and at threshold
# 0.85 95.2% of decode steps gave full decoding's token with 69% of tokens out (tuned: 94.4%,
# 57%). ~12 minutes: 3,000 answers, ~700k tokens cached, two passes.
DECODE_BF16=$([ "$DECODE_DTYPE" = bf16 ] && echo --bf16 || true)
python tools/make_distillation_corpus.py --load "$RUN/tuned" --output "$DATA/ee_distill.jsonl" \
    --max-prompts 3000 --one-line --batch-size 16 $DECODE_BF16
python tools/preprocess_data.py --input "$DATA/ee_distill.jsonl" --output-prefix "$DATA/ee_distill" --json-keys tokens \
    --loss-mask-key loss_mask --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA/tokenizer.model"
cache_activations "$RUN/tuned" "$DATA/ee_distill_tokens_document" "${DISTILL_TOKENS:-700000}" 32 "$RUN/distill_cache"
tune_exits "$RUN/tuned" "$RUN/distill_cache" 342 5e-4 5e-5 "$RUN/distilled" "$RUN/distill_log.jsonl"
calibrate "$RUN/distilled"
# The probes alone, once more, on the answers' positions of the same sequences (--tune-exit-confidence-only:
# the exits frozen; --data-loss-mask: the corpus's loss_mask, so a position counts where its label
# is an answer token, the text the probes then decide on): trained beside their exits, a probe
# chases a target that moves as the exit learns, for two passes; with the exits fixed its labels
# stay put, and more passes at a larger step keep paying. Along full decoding's summaries (40
# abstracts, teacher-forced) the probes' AUC at exits 3 / 6 went 0.814 / 0.762 (distilled) ->
# 0.875 / 0.834 (stop 73: every position, 2,050 steps of 16 x 256) -> 0.884 / 0.843 (stop 74: the
# answers' positions, 560 steps of 64 x 256, the same ~10 minutes; at threshold 0.85 76% of steps
# leave at 96.3% agreement against 74%), above the vocabulary's top2_margin at exit 3 (0.845),
# which a check would pay a projection for. runs/ee_aclsum/probes is the reference.
cache_activations "$RUN/tuned" "$DATA/ee_distill_tokens_document" "${DISTILL_TOKENS:-700000}" 32 \
    "$RUN/answers_cache" --data-loss-mask
python pretrain_early_exit_gpt.py --load "$RUN/distilled" --finetune --tune-exit --tune-exit-confidence-only \
    --exit-activation-cache "$RUN/answers_cache" --micro-batch-size 64 --global-batch-size 64 \
    --train-iters "${PROBE_ITERS:-560}" --lr 1e-2 --min-lr 1e-3 --lr-warmup-iters 30 --lr-decay-style cosine \
    $BF16 --log-interval 50 --eval-interval "${PROBE_ITERS:-560}" --eval-iters 1 --save "$RUN/probes" \
    --save-interval "${PROBE_ITERS:-560}" --log-jsonl "$RUN/probes_log.jsonl"
# Its thresholds calibrated in CALM's own setting: on the decode steps of the model's own one-line
# answers to every prompt that follows the 3,000 above (1,970 passages the probes never saw), one
# answer a unit: an answer's steps that would emit another token than full decoding given the same
# prefix, <= 5% on average with probability >= 90% (calibrate_thresholds.py --prompts). More
# answers, a tighter bound: from 600 of them the thresholds proved a risk of 3.9% with 77.5% of
# steps out (96.9% step agreement in the sweep); from 1,970, 4.5% with 79.2% out (96.4%), ~5 minutes.
python tools/make_distillation_corpus.py --load "$RUN/probes" --output "$DATA/ee_calibration_prompts.jsonl" \
    --skip-prompts 3000 --prompts-only
python tools/eval/calibrate_thresholds.py --load "$RUN/probes" --delta 0.05 --epsilon 0.1 \
    --prompts "$DATA/ee_calibration_prompts.jsonl" --num-prompts 2000 --max-new-tokens 48 --stop-at-newline \
    --batch-size 16 --measure learned $DECODE_BF16 --check-splits 20
python tools/eval/ee_sweep.py --load "$RUN/probes" --data "$DATA/test_summarization.jsonl" \
    --output "$RUN/sweep" --num-examples 40 $DECODE_BF16
