"""Shared fixtures: the built-in corpus (from the aclsum package) prepared once per session, and
one-thread decoding for modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

# Tests compare tokens and logits across runs and processes: nothing they compute may depend
# on timings. The CPU matrix-product kernel is chosen by timing it (inference/kernels.py), so
# the suite fixes it (tests of the choice and of each kernel set their own); subprocesses
# (torchrun, tools) inherit it.
os.environ.setdefault("EE_LINEAR_KERNEL", "plain")
# Likewise the cost-aware exit policy's decisions: from parameter counts, not timings.
os.environ.setdefault("EE_EXIT_COSTS", "parameters")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """data dir with train.jsonl, test_summarization.jsonl and a 2k-piece SentencePiece model."""
    from prepare_aclsum_corpus import prepare_corpus

    out = tmp_path_factory.mktemp("aclsum")
    prepare_corpus(str(out), sentencepiece_vocab_size=2000)
    return out


@pytest.fixture(scope="session")
def corpus_texts(corpus):
    import json

    with open(corpus / "train.jsonl") as f:
        docs = [json.loads(line)["text"] for line in f]
    return [p for d in docs[:20] for p in d.split("\n\n")][:300]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models decode fastest on one thread (and do not fight other test processes);
    the module's previous thread count comes back afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# `pytest -m "not slow"` (`make test-quick`): the suite without the equivalence tests that
# launch several processes (torchrun / spawn: parallel layouts against one process, parallel
# decoding and serving) and the real-model parity check. `make test` (and CI) runs them all.
SLOW_MODULES = {
    "test_parallel_training",
    "test_server_parallel",
    "test_signal_pp2",
    "test_data_parallel",
    "test_parallel_inference",
    "test_tensor_parallel",
}
SLOW_TESTS = {
    "test_smollm2_gguf_matches_transformers",
    "test_backbone_probe_training_is_layout_invariant",
    "test_probe_training_is_layout_invariant",
    "test_mlp_probe_training_is_layout_invariant",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
        if name in SLOW_MODULES or getattr(item, "originalname", item.name) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
