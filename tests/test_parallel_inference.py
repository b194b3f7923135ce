"""Tensor-, pipeline- and TP x PP decoding equal single-process decoding (gloo, CPU).

The tiny fp32 models of tests/test_inference.py (4 layers, exits on several stages) decode
a batch of 1 and of 4 prompts of different lengths. Each spawn covers many cases, since
starting processes dominates the time. Tokens and exit layers must be equal; confidences
agree to fp32 round-off (sharded matmuls and a different batching sum in another order).
Intermediate thresholds sit halfway between two observed confidences, far from any value
round-off could move across.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings
from megatron.early_exit.inference.passes import ExitPolicy
from tests.distributed import free_port, run_distributed
from tests.test_inference import PROMPTS, full_kv, make

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = 8
BATCHES = (PROMPTS[:1], PROMPTS)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def mid_threshold(model) -> float:
    """Halfway between the two middle exit confidences on a reference text (mixed exits)."""
    with torch.no_grad():
        out = model(torch.tensor([PROMPTS[2] + PROMPTS[0]]))
        conf = torch.cat([out.exit_logits[n][0].softmax(-1).max(-1).values for n in model.config.exit_layer_nums])
    ranked = conf.sort().values
    j = len(ranked) // 2
    return float(ranked[j - 1] + ranked[j]) / 2


def cases(model, tp: bool) -> list[tuple[list[list[int]], GenerationSettings]]:
    ee = dict(strategy="early_exit", max_new_tokens=NEW, exit_policy="exact")  # per-token exits, as the reference
    settings = [
        GenerationSettings(strategy="full", max_new_tokens=NEW),
        GenerationSettings(early_exit_threshold=1.0, **ee),
        GenerationSettings(early_exit_threshold=0.0, **ee),
        GenerationSettings(early_exit_threshold=mid_threshold(model), **ee),
    ]
    if tp:
        settings.append(GenerationSettings(strategy="self_speculative", max_new_tokens=NEW, num_draft_tokens=3))
        # drafts from the context too: every rank proposes from the same tokens and prices from weight counts
        settings.append(GenerationSettings(strategy="self_speculative", max_new_tokens=NEW, prompt_lookup_max=3))
    else:  # sampling and log-probabilities: logits travel to stage 0, which samples like one process
        mid = mid_threshold(model)
        settings.append(GenerationSettings(early_exit_threshold=mid, temperature=1.0, top_k=20, seed=7, **ee))
        settings.append(GenerationSettings(early_exit_threshold=mid, return_logprobs=True, **ee))
        if model.config.use_exit_confidence_head:
            settings.append(GenerationSettings(early_exit_threshold=0.5, measure="learned", **ee))
    return [(prompts, s) for s in settings for prompts in BATCHES]


SCORED = PROMPTS[2] + PROMPTS[0] + PROMPTS[2]  # a prompt scored row by row (the server's prompt scoring)


def scored_rows(engine, threshold: float):
    """`engine.score` of SCORED under early exit (exact rule) at `threshold`: each row's layer and logits."""
    policy = ExitPolicy(tuple(engine.exits), threshold, "max_prob")
    out = engine.score(engine.new_state(1, len(SCORED) + 1), {0: SCORED}, policy)
    return out.row_exit_layer[0], out.all_logits[0]


def summary(results):
    return [(r.tokens, r.exit_layers, r.confidences, r.logprobs) for r in results]


def assert_equal_decoding(got, want, what):
    for (tok, layers, conf, logp), (wtok, wlayers, wconf, wlogp) in zip(got, want):
        assert tok == wtok and layers == wlayers, what
        # fp32, same ops summed in another order (shards, batching): round-off only.
        torch.testing.assert_close(torch.tensor(conf), torch.tensor(wconf), rtol=1e-4, atol=1e-5, msg=what)
        if wlogp is not None:
            torch.testing.assert_close(torch.tensor(logp), torch.tensor(wlogp), rtol=1e-4, atol=1e-4, msg=what)


def reference(model, case_list):
    engine = EarlyExitEngine(model)
    return [summary(engine.generate(p, s)) for p, s in case_list]


# ----- tensor parallelism ----------------------------------------------------------------------


def _tp_worker(rank, world, family, case_list):
    from megatron.early_exit.inference.parallel import build_stage, make_engine
    from megatron.early_exit.parallel.dims import initialize

    pstate = initialize(world, 1, torch.device("cpu"))
    model, specs = build_stage(make(family).config, pstate, seed=3)
    engine = make_engine(model, None, pstate, specs)
    outs = [summary(engine.generate(p, s)) for p, s in case_list]
    state = engine.new_state(2, 8)
    return outs, tuple(state.cache.k.shape), scored_rows(engine, case_list[6][1].early_exit_threshold)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp2_decoding_equals_one_process(family):
    model = make(family)
    case_list = cases(model, tp=True)
    want = reference(model, case_list)
    mid = case_list[6][1]
    assert any(len(set(r[1][1:])) > 1 for r in want[6] + want[7]), mid  # the mid threshold mixes exits
    want_layers, want_logits = scored_rows(EarlyExitEngine(model), mid.early_exit_threshold)
    assert len(set(want_layers)) > 1
    ranks = run_distributed(_tp_worker, 2, family, case_list)
    for outs, kv_shape, (layers, logits) in ranks:
        assert layers == want_layers  # prompt scoring: every row's exit, as one process
        torch.testing.assert_close(logits, want_logits, rtol=1e-4, atol=1e-4)
        groups = model.config.num_query_groups // 2
        assert kv_shape == (4, 2, groups, 9, model.config.head_dim)  # this rank's query groups only
        for (prompts, s), got, ref in zip(case_list, outs, want):
            assert_equal_decoding(got, ref, (s.strategy, s.early_exit_threshold, len(prompts)))
    assert ranks[0][0] == ranks[1][0]  # every TP rank: the very same tokens, exits and confidences


# ----- pipeline parallelism --------------------------------------------------------------------


def _pp_worker(rank, world, family, case_list, kv_case, tp):
    from megatron.early_exit.inference.parallel import build_stage, make_engine
    from megatron.early_exit.parallel.dims import initialize

    pstate = initialize(tp, world // tp, torch.device("cpu"))
    model, specs = build_stage(make(family).config, pstate, seed=3)
    engine = make_engine(model, None, pstate, specs)
    outs = [summary(engine.generate(p, s)) for p, s in case_list]
    results, state = engine.decode(*kv_case)
    start, end = specs[pstate.pp_rank].layer_range
    kv = {}
    for b, r in enumerate(results):
        length = len(r.prompt_tokens) + len(r.tokens) - 1  # the last token is never fed
        assert state.cache.filled[:, b].tolist() == [length] * (end - start)
        for i in range(start, end):
            k, v = state.cache.k[i - start, b, :, :length], state.cache.v[i - start, b, :, :length]
            kv[i, b, pstate.tp_rank] = (k.clone(), v.clone())  # (local groups, T, hd)
    return outs, kv, [(r.tokens, r.prompt_tokens) for r in results]


def check_pipeline(family, pp, tp=1):
    model = make(family)
    case_list = cases(model, tp=False)
    want = reference(model, case_list)
    kv_case = (
        PROMPTS,
        GenerationSettings("early_exit", max_new_tokens=NEW, early_exit_threshold=0.0, exit_policy="exact"),
    )
    ranks = run_distributed(_pp_worker, pp * tp, family, case_list, kv_case, tp)
    for outs, _, _ in ranks:
        for (prompts, s), got, ref in zip(case_list, outs, want):
            what = (pp, s.measure, s.early_exit_threshold, s.temperature, len(prompts))
            assert_equal_decoding(got, ref, what)
    # Each stage holds the full model's K/V for its layers, exited tokens included: filled right
    # away from the exit's hidden state instead of recomputed later.
    seen = set()
    for _, kv, decoded in ranks:
        for (layer, b, tp_rank), (k, v) in kv.items():
            tokens, prompt = decoded[b]
            ref_k, ref_v = (t.chunk(tp)[tp_rank] for t in full_kv(model, torch.tensor([prompt + tokens[:-1]]))[layer])
            torch.testing.assert_close(k, ref_k, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, ref_v, rtol=1e-5, atol=1e-5)
            seen.add(layer)
    assert seen == set(range(model.config.num_layers))


@pytest.mark.parametrize("family", ["llama", "gpt2", "pre_exit_block"])
def test_pp2_decoding_equals_one_process(family):
    check_pipeline(family, 2)


def test_pp4_decoding_equals_one_process():
    check_pipeline("llama", 4)


def test_tp2_pp2_decoding_equals_one_process():
    check_pipeline("gpt2", 2, tp=2)


def test_pipeline_rejects_self_speculative():
    from megatron.early_exit.inference.pipeline import PipelineEngine
    from megatron.early_exit.parallel.dims import single_process_state
    from megatron.early_exit.parallel.pipeline import stages_for

    model = make("llama")
    engine = PipelineEngine(model, single_process_state(torch.device("cpu")), stages_for(model.config, 1))
    with pytest.raises(ValueError, match="self_speculative"):
        engine.generate(PROMPTS, GenerationSettings("self_speculative"))
    # One stage is the whole model: the pipeline engine then decodes like the plain one.
    s = GenerationSettings(
        "early_exit", max_new_tokens=NEW, early_exit_threshold=mid_threshold(model), exit_policy="exact"
    )
    assert_equal_decoding(summary(engine.generate(PROMPTS, s)), reference(model, [(PROMPTS, s)])[0], "pp1")


# ----- the CLI under torchrun ------------------------------------------------------------------


def test_generate_cli_under_torchrun_tp2(tmp_path):
    from megatron.early_exit.checkpointing import save_checkpoint
    from megatron.early_exit.tokenizer.null import NullTokenizer

    model = make("llama")
    save_checkpoint(str(tmp_path / "ck"), 0, model, NullTokenizer(63))
    args = ["--load", str(tmp_path / "ck"), "--prompt", "1 2 3", "--prompt", "5 6", "--max-new-tokens", "5"]
    args += ["--strategy", "early_exit", "--early-exit-thres", "0", "--exit-policy", "exact", "--json"]
    single = subprocess.run([sys.executable, "tools/generate.py", *args], capture_output=True, text=True, cwd=ROOT)
    assert single.returncode == 0, single.stderr
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for flag in ("--tensor-model-parallel-size", "--pipeline-model-parallel-size"):
        proc = subprocess.run(
            [*run, "tools/generate.py", *args, flag, "2"], capture_output=True, text=True, cwd=ROOT, env=env
        )
        assert proc.returncode == 0, proc.stderr
        rows, want = (
            [json.loads(x) for x in proc.stdout.splitlines()],
            [json.loads(x) for x in single.stdout.splitlines()],
        )
        assert len(rows) == 2  # rank 0 prints, the other rank stays silent
        for row, ref in zip(rows, want):
            assert (row["tokens"], row["exit_layers"]) == (ref["tokens"], ref["exit_layers"]), flag
