"""lm-evaluation-harness in process (`megatron-ee`) against the REST server through lm-eval's own
`local-completions` model, on the local aclsum_mini tasks (tools/eval/lm_eval_tasks): the same
log-likelihoods to round-off, the same greedy generations; early exit scored exactly as the
exits' own logits say, with its telemetry in the results.
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[eval]')")
pytest.importorskip("tenacity", reason="lm-eval's API models need lm_eval[api]")
pytest.importorskip("fastapi")

from tests.test_server import start_server, stop_server  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS_DIR = os.path.join(ROOT, "tools", "eval", "lm_eval_tasks")
TASKS = ["aclsum_mini_mc", "aclsum_mini_ppl", "aclsum_mini_gen"]
LIMIT = 2  # documents per task in the early-exit runs (token-by-token scoring)
TOL = 2e-4  # nats per request: same weights, different batching of the same fp32 sums

pytestmark = pytest.mark.usefixtures("one_thread")


def build_checkpoint(directory: str) -> tuple[str, str]:
    """A 4-layer Llama-style model (exits after 1-3) with a 400-token BPE trained on the task's
    text; returns (checkpoint, tokenizer folder that transformers.AutoTokenizer reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.model import EarlyExitGPT
    from megatron.early_exit.tokenizer.huggingface import HuggingFaceTokenizer

    with open(os.path.join(TASKS_DIR, "aclsum_mini", "aclsum_mini.jsonl")) as f:
        docs = [json.loads(line) for line in f]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([d[k] for d in docs for k in ("challenge", "approach", "outcome")], trainer)
    tok_dir = os.path.join(directory, "tokenizer")
    os.makedirs(tok_dir)
    bpe.save(os.path.join(tok_dir, "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}  # no BOS: eos prefixes
    with open(os.path.join(tok_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    tok = HuggingFaceTokenizer(tok_dir)
    cfg = ModelConfig(
        num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=416, max_position_embeddings=512,
        normalization="RMSNorm", swiglu=True, position_embedding_type="rope", add_bias_linear=False,
        num_query_groups=2, exit_layer_nums=[1, 2, 3], use_exit_norm=True, use_exit_mlp=True,
        real_vocab_size=tok.vocab_size,
    )  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(5)
    path = os.path.join(directory, "ck")
    save_checkpoint(path, 0, model, tok)
    return path, tok_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("lm_eval")))


@functools.lru_cache(maxsize=1)
def task_manager():
    """Only the local tasks: indexing lm-eval's thousands of built-in task files takes many seconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=TASKS_DIR, include_defaults=False)


@pytest.fixture(scope="module", autouse=True)
def no_env_report():
    """lm-eval appends `torch.utils.collect_env`'s report to every result (~7 s of subprocesses)."""
    import lm_eval.evaluator

    before = lm_eval.evaluator.add_env_info
    lm_eval.evaluator.add_env_info = lambda results: None
    yield
    lm_eval.evaluator.add_env_info = before


def evaluate(model: str, model_args: dict, tasks=TASKS, batch_size: int = 4, limit: int | None = None) -> dict:
    import megatron.early_exit.eval.lm_eval_model  # noqa: F401  (registers megatron-ee)

    manager = task_manager()
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=list(tasks), task_manager=manager, batch_size=batch_size,
        limit=limit, log_samples=True, bootstrap_iters=0, verbosity="WARNING",
    )  # fmt: skip


def scores(results: dict, task: str) -> list:
    """Per document: [log-likelihood per choice] (mc), log-likelihood (ppl) or the generated text."""
    out = []
    for s in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        resps = [r[0] for r in s["resps"]]
        if task.endswith("_mc"):
            out.append([float(r[0]) for r in resps])
        elif task.endswith("_ppl"):
            out.append(float(resps[0]))
        else:
            out.append(resps[0])
    return out


def flat(results: dict, task: str) -> list[float]:
    return [x for doc in scores(results, task) for x in doc]


@pytest.fixture(scope="module")
def in_process(ckpt):
    return evaluate("megatron-ee", {"load": ckpt[0], "strategy": "full"})


def test_in_process_equals_local_completions_against_the_server(ckpt, in_process):
    path, tok_dir = ckpt
    proc, url = start_server(path, "--max-batch-size", "8")
    try:
        args = {"model": "ck", "base_url": url + "/v1/completions", "tokenizer": tok_dir, "tokenizer_backend":
                "huggingface", "max_length": 513, "max_retries": 1, "num_concurrent": 1}  # fmt: skip
        remote = evaluate("local-completions", args)
    finally:
        stop_server(proc)
    mc, ppl = scores(in_process, "aclsum_mini_mc"), scores(in_process, "aclsum_mini_ppl")
    print("\nlm-eval aclsum_mini_mc (6 docs x 3 choices), in process:", json.dumps(mc))
    print("local-completions:", json.dumps(scores(remote, "aclsum_mini_mc")))
    print("aclsum_mini_ppl (6 docs), in process:", json.dumps(ppl))
    print("local-completions:", json.dumps(scores(remote, "aclsum_mini_ppl")))
    assert len(mc) == 6 and all(len(c) == 3 and all(x < 0 for x in c) for c in mc)
    assert flat(in_process, "aclsum_mini_mc") == pytest.approx(flat(remote, "aclsum_mini_mc"), abs=TOL)
    assert ppl == pytest.approx(scores(remote, "aclsum_mini_ppl"), abs=TOL)
    assert scores(in_process, "aclsum_mini_gen") == scores(remote, "aclsum_mini_gen")
    for task in TASKS:  # the aggregate metrics follow
        for key, value in in_process["results"][task].items():
            if isinstance(value, float) and key != "alias":
                assert value == pytest.approx(remote["results"][task][key], rel=1e-4), (task, key)


def test_scores_equal_a_plain_forward(ckpt, in_process):
    """The in-process numbers are the model's own: log-softmax of `model(ids).logits`."""
    from megatron.early_exit import load_checkpoint

    model, tok = load_checkpoint(ckpt[0])
    for doc, want in zip(read_docs()[:2], scores(in_process, "aclsum_mini_mc")):
        ctx = tok.tokenize(f"Challenge: {doc['challenge']}\nApproach:")
        got = [continuation_logprob(model, tok, ctx, tok.tokenize(" " + c), {}) for c in doc["choices"]]
        assert got == pytest.approx(want, abs=TOL)


def read_docs() -> list[dict]:
    with open(os.path.join(TASKS_DIR, "aclsum_mini", "aclsum_mini.jsonl")) as f:
        return [json.loads(line) for line in f]


@torch.no_grad()
def continuation_logprob(model, tok, ctx: list[int], cont: list[int], head_of: dict) -> float:
    """Sum of log p(cont[j] | ...), token j read from exit head_of.get(j) (None: the final head)."""
    out = model(torch.tensor([ctx + cont]))
    total = 0.0
    for j, t in enumerate(cont):
        head = head_of.get(j)
        logits = out.logits if head is None else out.exit_logits[head]
        total += float(torch.log_softmax(logits[0, len(ctx) + j - 1, : tok.vocab_size].float(), -1)[t])
    return total


def test_early_exit_scoring_and_telemetry(ckpt, in_process):
    from megatron.early_exit import load_checkpoint

    # threshold 1.0 never exits: the full model's numbers, every token at the last layer
    args = {"load": ckpt[0], "strategy": "early_exit", "threshold": 1.0}
    never = evaluate("megatron-ee", args, TASKS[:2], batch_size=6, limit=LIMIT)
    assert flat(never, "aclsum_mini_mc") == pytest.approx(flat(in_process, "aclsum_mini_mc")[: 3 * LIMIT], abs=TOL)
    assert scores(never, "aclsum_mini_ppl") == pytest.approx(scores(in_process, "aclsum_mini_ppl")[:LIMIT], abs=TOL)
    tele = never["config"]["early_exit"]
    assert tele["all"]["early_exit_share"] == 0.0 and tele["all"]["average_exit_layer"] == 4.0

    # threshold 0.0, exits 2 only: every continuation token after the first (from the prefill)
    # leaves at layer 2, and its log-probability is exit 2's
    args = {"load": ckpt[0], "strategy": "early_exit", "threshold": 0.0, "exit_layers": "2"}
    always = evaluate("megatron-ee", args, ["aclsum_mini_mc", "aclsum_mini_gen"], batch_size=6, limit=LIMIT)
    model, tok = load_checkpoint(ckpt[0])
    doc = read_docs()[0]
    ctx = tok.tokenize(f"Challenge: {doc['challenge']}\nApproach:")
    conts = [tok.tokenize(" " + c) for c in doc["choices"]]
    want = [continuation_logprob(model, tok, ctx, c, dict.fromkeys(range(1, len(c)), 2)) for c in conts]
    assert scores(always, "aclsum_mini_mc")[0] == pytest.approx(want, abs=TOL)
    tele = always["config"]["early_exit"]
    n_tokens = sum(len(tok.tokenize(" " + c)) for d in read_docs()[:LIMIT] for c in d["choices"])
    n_requests = 3 * LIMIT  # the first token of each continuation comes from the prefill's final head
    ll = tele["loglikelihood"]
    assert ll["tokens"] == n_tokens and ll["exit_share"]["4"] == pytest.approx(n_requests / n_tokens)
    assert ll["early_exit_share"] == pytest.approx(1 - n_requests / n_tokens)
    assert tele["generate"]["tokens"] > 0 and tele["generate"]["exit_share"]["2"] > 0.5
    assert tele["strategy"] == "early_exit" and tele["threshold"] == 0.0 and tele["model_exits"] == [1, 2, 3]


def test_cli_runs_the_plugin(ckpt, tmp_path, monkeypatch, capsys):
    """`python -m megatron.early_exit.eval` is lm-eval's CLI with megatron-ee registered (run here
    with runpy rather than a new interpreter, to save its imports)."""
    argv = ["megatron.early_exit.eval", "--model", "megatron-ee", "--model_args",
            f"load={ckpt[0]},strategy=early_exit,threshold=0.0", "--include_path", TASKS_DIR, "--tasks",
            "aclsum_mini_ppl", "--limit", "1", "--batch_size", "4", "--output_path", str(tmp_path)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_module("megatron.early_exit.eval", run_name="__main__")
    out = capsys.readouterr().out
    assert "aclsum_mini_ppl" in out and "word_perplexity" in out
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.startswith("results")]
    with open(path) as f:
        tele = json.load(f)["config"]["early_exit"]["loglikelihood_rolling"]
    assert tele["tokens"] > 0 and 0 < tele["early_exit_share"] < 1 and tele["average_exit_layer"] < 4


def test_bad_model_args_name_the_setting(ckpt):
    from megatron.early_exit.eval.lm_eval_model import EarlyExitLM

    with pytest.raises(ValueError, match="strategy"):
        EarlyExitLM(load=ckpt[0], strategy="fastest")
    with pytest.raises(ValueError, match="exit_layers"):
        EarlyExitLM(load=ckpt[0], exit_layers="7")
    with pytest.raises(ValueError, match="load="):
        EarlyExitLM()


def test_long_requests_keep_the_continuation_and_a_context_token():
    from megatron.early_exit.eval.lm_eval_model import EarlyExitLM

    lm = EarlyExitLM.__new__(EarlyExitLM)  # _fit needs only max_length
    lm.max_length = 8  # 8 tokens fed: 9 in context + continuation (the last is only a target)
    assert lm._fit([1, 2, 3, 4, 5, 6], [7, 8, 9]) == ([1, 2, 3, 4, 5, 6], [7, 8, 9])
    assert lm._fit([0, 1, 2, 3, 4, 5, 6], [7, 8, 9]) == ([1, 2, 3, 4, 5, 6], [7, 8, 9])
    assert lm._fit([1, 2], list(range(10, 30))) == ([2], list(range(22, 30)))
    with pytest.raises(ValueError, match="continuation"):
        lm._fit([1], [])


@torch.no_grad()
def test_rolling_windows_on_a_short_context_model(ckpt):
    """A GPT-2-style model with 16 learned positions: a text of ~40 tokens is scored in disjoint
    windows, each window equal to a plain forward over it; early exit at threshold 1.0 agrees."""
    from types import SimpleNamespace

    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.config import ModelConfig
    from megatron.early_exit.eval.lm_eval_model import EarlyExitLM
    from megatron.early_exit.model import EarlyExitGPT

    _, tok = load_checkpoint(ckpt[0])
    cfg = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=416, max_position_embeddings=16,
                      exit_layer_nums=[1], real_vocab_size=tok.vocab_size)  # fmt: skip
    model = EarlyExitGPT(cfg)
    model.init_weights(1)
    text = read_docs()[0]["outcome"]
    ids = tok.tokenize(text)
    want = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(ids, tok.eod, 16, 1)):
        window = ctx + cont  # up to 17 tokens: the last is only a target, 16 are fed
        logp = torch.log_softmax(model(torch.tensor([window[:-1]])).logits[0, :, : tok.vocab_size].float(), -1)
        want += sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
    requests = [SimpleNamespace(args=(text,))]
    for args in ({"strategy": "full"}, {"strategy": "early_exit", "threshold": 1.0}):
        lm = EarlyExitLM(model=model, tokenizer=tok, batch_size=2, **args)
        assert len(ids) > 32 and lm.loglikelihood_rolling(requests, disable_tqdm=True) == [pytest.approx(want, abs=TOL)]
        assert lm.get_model_info()["early_exit"]["loglikelihood_rolling"]["tokens"] == len(ids)
