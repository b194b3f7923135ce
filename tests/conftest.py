"""Shared fixtures: the built-in corpus (from the aclsum package) prepared once per session."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))


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
