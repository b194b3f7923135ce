#!/usr/bin/env python
"""Turn the `aclsum` package's 250 papers into the built-in corpus (jsonl with a "text" field).

    python tools/prepare_aclsum_corpus.py --output data/aclsum

Writes:
  train.jsonl                 one document per paper: title, abstract and body paragraphs
  test_summarization.jsonl    aclsum's test split: the abstract text and its one-sentence
                              reference summaries (challenge / approach / outcome), for evaluation
  tokenizer.model             a SentencePiece BPE model trained on the corpus paragraphs
                              (--sentencepiece-vocab-size, default 8000; 0 skips it): a small
                              vocabulary keeps exit heads cheap on a CPU
Install the data with `pip install --no-deps aclsum==0.1.2`.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import sys


def aclsum_dir() -> str:
    spec = importlib.util.find_spec("aclsum")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("the aclsum package is not installed: pip install --no-deps aclsum==0.1.2")
    return os.path.join(list(spec.submodule_search_locations)[0], "dataset")


def paper_text(paper: dict) -> str:
    parts = [paper.get("title") or "", paper.get("abstract") or ""]
    parts += [p["text"] for p in paper.get("pdf_parse", {}).get("body_text", []) if p.get("text")]
    return "\n\n".join(p.strip() for p in parts if p and p.strip())


def detok(sentences: list[str]) -> str:
    """aclsum's sentences are tokenised with spaces around punctuation; undo the common cases."""
    text = " ".join(sentences)
    for a, b in ((" ,", ","), (" .", "."), (" ;", ";"), (" :", ":"), ("( ", "("), (" )", ")"), (" 's", "'s")):
        text = text.replace(a, b)
    return text


def train_sentencepiece(train_jsonl: str, output_dir: str, vocab_size: int) -> str:
    """A byte-fallback BPE SentencePiece model over the corpus paragraphs (eos = 1, bos = 2)."""
    import sentencepiece

    def paragraphs():
        with open(train_jsonl, encoding="utf-8") as f:
            for line in f:
                for para in json.loads(line)["text"].split("\n\n"):
                    if para.strip():
                        yield para[:4000]

    prefix = os.path.join(output_dir, "tokenizer")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=paragraphs(), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=0.9995, num_threads=2, minloglevel=2,
        unk_id=0, eos_id=1, bos_id=2, pad_id=-1,
    )  # fmt: skip
    print(f"trained a {vocab_size}-piece SentencePiece model: {prefix}.model")
    return prefix + ".model"


def prepare_corpus(output_dir: str, sentencepiece_vocab_size: int = 0) -> str:
    """Write the corpus files into `output_dir`; returns the path of train.jsonl."""
    src = aclsum_dir()
    os.makedirs(output_dir, exist_ok=True)
    papers = sorted(glob.glob(os.path.join(src, "paper_jsons", "*.json")))
    train = os.path.join(output_dir, "train.jsonl")
    chars = 0
    with open(train + ".tmp", "w", encoding="utf-8") as out:
        for path in papers:
            with open(path, encoding="utf-8") as f:
                text = paper_text(json.load(f))
            chars += len(text)
            out.write(json.dumps({"text": text}) + "\n")
    os.replace(train + ".tmp", train)
    n_test = 0
    with (
        open(os.path.join(src, "test.jsonl"), encoding="utf-8") as f,
        open(os.path.join(output_dir, "test_summarization.jsonl"), "w", encoding="utf-8") as out,
    ):
        for line in f:
            item = json.loads(line)
            record = {"id": item["id"], "abstract": detok(item["sentences"]["abstract"]), **item["summary"]}
            out.write(json.dumps(record) + "\n")
            n_test += 1
    print(
        f"wrote {len(papers)} documents ({chars / 1e6:.1f}M characters) to {train}; "
        f"{n_test} summarization examples to {output_dir}/test_summarization.jsonl"
    )
    if sentencepiece_vocab_size:
        train_sentencepiece(train, output_dir, sentencepiece_vocab_size)
    return train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="data/aclsum")
    p.add_argument("--sentencepiece-vocab-size", type=int, default=8000, help="0: do not train one")
    args = p.parse_args()
    try:
        prepare_corpus(args.output, args.sentencepiece_vocab_size)
    except (ValueError, OSError) as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)


if __name__ == "__main__":
    main()
