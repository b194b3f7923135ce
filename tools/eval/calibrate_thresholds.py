#!/usr/bin/env python
"""Calibrate per-exit early-exit thresholds with CALM's Learn-Then-Test guarantee.

    python tools/eval/calibrate_thresholds.py --load CKPT --delta 0.05 --epsilon 0.1 \\
        --data-path data/aclsum/smollm2_text_document --split 98,2,0 --measure max_prob

On held-out text (the validation split of `--data-path` under `--split`, or `--input`
JSON lines with a "text" field), teacher-forced, it picks thresholds such that, with
probability >= 1 - epsilon, the early-exit decision (the first exit whose confidence >= its
threshold) disagrees with the final head's top-1 on at most delta of tokens. The text is
cut into `--seq-length` chunks, taken as i.i.d.; p-values on per-chunk disagreement
(`--bound`: Waudby-Smith-Ramdas betting, or Hoeffding-Bentkus), fixed-sequence testing along a
path of threshold vectors (details:
megatron/early_exit/inference/calibration.py). The thresholds, delta, epsilon, the measure,
each exit's top-1 agreement with the final head (self-speculative decoding's warm start), the
draft vocabulary (the fewest tokens that make up `--draft-vocab-coverage` of the final head's
top-1 tokens on that text: self-speculative drafts, and with a measure that decides without the
vocabulary (learned) the tokens leaving early in greedy decoding, are chosen from them alone, so
each exit's agreement is counted as a disagreement wherever the final head's token lies outside
them: `exit_vocabulary` "draft" in the record) and the calibration
data are written into the checkpoint (`early_exit_thresholds.json` and a section of its
README.md model card); `tools/generate.py --early-exit-thres auto` uses them.

`--prompts F.jsonl` (lines with a "prompt" string; `tools/make_distillation_corpus.py
--prompts-only` writes them) calibrates in CALM's own setting instead: the model answers each
prompt by full greedy decoding, and the units are its answers, teacher-forced: a unit's loss is
the share of its decode steps at which the early-exit decision would emit another token than full
decoding given the same prefix (what the sweep's `step_agreement` counts), so the thresholds
bound the disagreement of decoding itself rather than of text the model reads.

`--check-splits N` then tests the guarantee itself: it calibrates again on N random
calibration/test splits of the chunks and prints, per split, the thresholds, the realised
disagreement on the test chunks and the share of tokens leaving at each exit, and in a summary
the share of splits whose disagreement exceeds delta, to compare with epsilon. The result
goes into the record and the model card.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.early_exit.arguments import OneLineErrorParser, run_tool  # noqa: E402
from megatron.early_exit.inference import calibration  # noqa: E402
from megatron.early_exit.inference.confidence import get_measure  # noqa: E402

CARD_START, CARD_END = "<!-- calibrated-thresholds -->", "<!-- /calibrated-thresholds -->"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", required=True, help="checkpoint with exits (the thresholds are written into it)")
    p.add_argument(
        "--delta", type=float, required=True, help="tolerated share of tokens that differ from the final head"
    )
    p.add_argument("--epsilon", type=float, required=True, help="allowed probability that the guarantee fails")
    p.add_argument("--data-path", nargs="+", help="Megatron .bin/.idx prefix: its --split validation part is used")
    p.add_argument("--split", default="98,2,0")
    p.add_argument("--input", help='held-out JSON lines with a "text" field (instead of --data-path)')
    p.add_argument(
        "--prompts",
        help='JSON lines with a "prompt" string (instead of --data-path): calibrate on the decode steps of the '
        "model's own full greedy answers to them, one answer a unit (CALM's setting)",
    )
    p.add_argument("--num-prompts", type=int, default=300, help="--prompts: the first N (default 300)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="--prompts: tokens an answer may have (default 48)")
    p.add_argument(
        "--stop-at-newline", action="store_true", help="--prompts: an answer ends at its first newline (one line)"
    )
    p.add_argument("--measure", choices=["max_prob", "top2_margin", "entropy", "learned"], default="max_prob")
    p.add_argument("--seq-length", type=int, default=128, help="tokens per chunk (default 128)")
    p.add_argument("--num-chunks", type=int, default=256, help="chunks of held-out text (default 256)")
    p.add_argument(
        "--path",
        choices=["quantile", "shared", "precision"],
        default="quantile",
        help="threshold path (see megatron/early_exit/inference/calibration.py)",
    )
    p.add_argument(
        "--bound", choices=list(calibration.BOUNDS), default="wsr",
        help="p-values: wsr (Waudby-Smith-Ramdas betting, variance-adaptive; default) or hb (Hoeffding-Bentkus)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, default=101, help="threshold vectors on the path")
    p.add_argument(
        "--fit-fraction", type=float, default=0.3, help="quantile and precision paths: share of chunks that fit it"
    )
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--check-splits",
        type=int,
        default=0,
        metavar="N",
        help="also calibrate on N random calibration/test splits of the chunks and report how often the "
        "realised test disagreement exceeds delta, against epsilon (default 0: off)",
    )
    p.add_argument(
        "--check-test-fraction", type=float, default=0.5, help="--check-splits: share of chunks held out for testing"
    )
    p.add_argument(
        "--draft-vocab-coverage", type=float, default=0.995, metavar="SHARE",
        help="also record the fewest tokens that make up SHARE of the final head's top-1 tokens on this text "
        "(self-speculative drafts then project onto them alone; default 0.995; 0: none)",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the thresholds, write nothing")
    return p


def chunks_from_jsonl(path: str, tok, length: int, count: int) -> torch.Tensor:
    ids: list[int] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    ids += tok.tokenize(json.loads(line)["text"]) + [tok.eod]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(f'--input {path}:{n}: needs a JSON object with a "text" string') from None
            if len(ids) >= length * count:
                break
    usable = min(count, len(ids) // length)
    return torch.tensor(ids[: usable * length]).view(usable, length)


def chunks_from_corpus(a, tok) -> torch.Tensor:
    """The first --num-chunks chunks of one epoch of the validation part: asking megatron-core
    for more samples than one epoch holds would repeat its text (overlapping chunks, not i.i.d.)."""
    from megatron.early_exit.data import build_datasets

    # asked for 1 sample, megatron-core builds exactly one epoch (165 chunks of 128 tokens on aclsum)
    _, valid, _ = build_datasets(
        tokenizer=tok, seq_length=a.seq_length, seed=a.seed, data_path=a.data_path, split=a.split,
        train_samples=0, valid_samples=1, test_samples=0,
    )  # fmt: skip
    if valid is None:
        raise ValueError(f"--split {a.split}: no validation part of --data-path to calibrate on")
    count = min(a.num_chunks, len(valid))
    if count < a.num_chunks:
        print(f"--num-chunks {a.num_chunks}: the validation part holds {count} chunks of {a.seq_length} tokens")
    return torch.stack([torch.as_tensor(valid[i]["tokens"]) for i in range(count)]).long()


def load_prompts(path: str, tok, count: int) -> list[list[int]]:
    """The first `count` prompts of a --prompts file, tokenized."""
    if not os.path.isfile(path):
        raise ValueError(f"--prompts: no such file: {path}")
    prompts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["prompt"]
                if not isinstance(text, str) or not text:
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                where = f"--prompts {path}:{n}"
                raise ValueError(f'{where}: needs a JSON object with a non-empty "prompt" string') from None
            prompts.append(tok.tokenize(text))
            if len(prompts) >= count:
                break
    return prompts


def answer_scores(a, model, tok) -> tuple[calibration.ExitScores, dict]:
    """--prompts: the model's full greedy answers to the prompts, teacher-forced (`forced_steps`),
    one chunk an answer (`generation_scores`), and what the record says of them."""
    from megatron.early_exit.inference import EarlyExitEngine, GenerationSettings

    if a.num_prompts < 20 or a.max_new_tokens < 2:
        got = f"{a.num_prompts}, {a.max_new_tokens}"
        raise ValueError(f"--num-prompts must be >= 20 and --max-new-tokens >= 2, got {got}")
    prompts = load_prompts(a.prompts, tok, a.num_prompts)
    engine = EarlyExitEngine(model, tok)
    stops = ("\n",) if a.stop_at_newline else ()
    settings = GenerationSettings("full", max_new_tokens=a.max_new_tokens, stop_strings=stops)
    outputs = []
    for start in range(0, len(prompts), a.batch_size):
        outputs += [r.tokens for r in engine.generate(prompts[start : start + a.batch_size], settings)]
        print(f" answered {len(outputs)}/{len(prompts)} prompts", flush=True)
    steps = calibration.forced_steps(model, prompts, outputs, a.measure)
    scores = calibration.generation_scores(steps, [len(o) - 1 for o in outputs])
    if scores.confidence.shape[0] < 20:
        raise ValueError(f"--prompts: only {scores.confidence.shape[0]} answers have a decode step; need >= 20")
    data = {
        "source": f"{a.prompts}: the model's full greedy answers (up to {a.max_new_tokens} tokens"
        f"{', one line' if a.stop_at_newline else ''}), teacher-forced",
        "num_chunks": int(scores.confidence.shape[0]), "chunk_length": "one answer",
        "decode_steps": int(steps.target.numel()), "seed": a.seed,
    }  # fmt: skip
    return scores, data


def load_chunks(a, tok) -> torch.Tensor:
    if a.input and not os.path.isfile(a.input):
        raise ValueError(f"--input: no such file: {a.input}")
    chunks = chunks_from_jsonl(a.input, tok, a.seq_length, a.num_chunks) if a.input else chunks_from_corpus(a, tok)
    if chunks.shape[0] < 20:
        raise ValueError(f"--input/--data-path: only {chunks.shape[0]} chunks of {a.seq_length} tokens; need >= 20")
    return chunks


def model_card(record: dict) -> str:
    thresholds = ", ".join(f"exit {k}: {v:.4f}" for k, v in record["thresholds"].items())
    data = record["calibration_data"]
    return (
        f"{CARD_START}\n## Calibrated early-exit thresholds\n\n"
        f"- thresholds ({record['measure']}): {thresholds}\n"
        f"- guarantee: with probability >= {1 - record['epsilon']:g}, {_guaranteed(record)} "
        f"(teacher-forced; Learn-Then-Test, {record['method']})\n"
        f"- calibration data: {data['source']}, {_units(data)} "
        f"({record['num_fit_chunks']} fit the path, {record['num_test_chunks']} tested)\n"
        f"- on the tested chunks: disagreement {record['risk']:.4f}, early-exit share {record['exit_share']:.4f}, "
        f"p-value {record['p_value']:.4g}\n"
        f"{_card_split_check(record.get('split_check'))}"
        f"{_card_agreement(record.get('agreement'))}"
        f"{_card_draft_vocabulary(record.get('draft_vocabulary'))}"
        f"- use: `tools/generate.py --load CKPT --early-exit-thres auto`; made {record['created']}\n{CARD_END}\n"
    )


def _guaranteed(record: dict) -> str:
    if record["calibration_data"]["chunk_length"] == "one answer":
        return (
            f"an answer's early-exit decode steps emit another token than full decoding given the same prefix at "
            f"most {record['delta']:g} of the time on average over answers"
        )
    return f"at most {record['delta']:g} of tokens differ from the final head's top-1"


def _units(data: dict) -> str:
    if data["chunk_length"] == "one answer":
        return f"{data['num_chunks']} answers, {data['decode_steps']} decode steps (one answer a unit)"
    return f"{data['num_chunks']} chunks x {data['chunk_length']} tokens"


def draft_vocabulary_line(drafts: dict | None, vocab: int, target: float) -> str:
    if drafts is None:
        return f"draft vocabulary: none ({100 * target:g}% of the final head's tokens take over half of {vocab})"
    return (
        f"draft vocabulary: {len(drafts['tokens'])} of {vocab} tokens make up {100 * drafts['coverage']:.2f}% of the "
        f"final head's top-1 tokens on the calibration text ({drafts['num_tokens']} tokens)"
    )


def _card_draft_vocabulary(drafts: dict | None) -> str:
    if not drafts:
        return ""
    return (
        f"- self-speculative drafts project onto {len(drafts['tokens'])} tokens, {100 * drafts['coverage']:.2f}% of "
        f"the final head's top-1 tokens on the calibration text\n"
    )


def _card_agreement(agreement: dict | None) -> str:
    if not agreement:  # records written before agreement was recorded
        return ""
    shares = ", ".join(f"exit {k}: {100 * v:.1f}%" for k, v in agreement.items())
    return f"- top-1 agreement with the final head (each exit alone; self-speculation's warm start): {shares}\n"


def _card_split_check(d: dict | None) -> str:
    if d is None:
        return ""
    return (
        f"- checked over random splits: {split_summary(d)[len('split check: ') :]} "
        f"({100 * d['test_fraction']:g}% of the chunks tested in each split)\n"
    )


def split_lines(check: calibration.SplitCheck) -> list[str]:
    """One line per split and a summary line (`--check-splits`)."""
    lines = []
    for i, r in enumerate(check.splits):
        thresholds = ", ".join(f"{e}: {t:.4f}" for e, t in zip(check.exits, r.thresholds))
        leave = ", ".join(f"exit {e} {100 * x:.1f}%" for e, x in zip(check.exits, r.exit_shares))
        lines.append(
            f"split {i:>3}: thresholds {{{thresholds}}} | test disagreement {r.test_risk:.4f}"
            f"{' > delta' if r.violates(check.delta) else ''} | leaving at {leave}, "
            f"final {100 * (1 - sum(r.exit_shares)):.1f}%"
        )
    lines.append(split_summary(check.as_dict()))
    return lines


def split_summary(d: dict) -> str:
    verdict = "holds" if d["holds"] else "FAILS"
    return (
        f"split check: {d['violations']} of {d['num_splits']} random calibration/test splits "
        f"({100 * d['violation_share']:.1f}%) exceed delta {d['delta']:g} in realised test disagreement "
        f"(mean {d['mean_test_risk']:.4f}, max {d['max_test_risk']:.4f}; {100 * d['mean_exit_share']:.1f}% of "
        f"tokens exit early); epsilon {d['epsilon']:g}: {verdict}"
    )


def write_into_checkpoint(directory: str, record: dict) -> None:
    from megatron.early_exit.checkpointing import THRESHOLDS_FILE

    tmp = os.path.join(directory, THRESHOLDS_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(directory, THRESHOLDS_FILE))
    readme = os.path.join(directory, "README.md")
    text = open(readme).read() if os.path.exists(readme) else ""
    if CARD_START in text and CARD_END in text:  # replace the previous calibration's section
        head, rest = text.split(CARD_START, 1)
        text = head + rest.split(CARD_END, 1)[1].lstrip("\n")
    with open(readme, "w") as f:
        f.write(text + ("\n" if text and not text.endswith("\n") else "") + model_card(record))


def run(a: argparse.Namespace) -> dict:
    from megatron.early_exit import load_checkpoint
    from megatron.early_exit.checkpointing import resolve_checkpoint_dir

    if a.check_splits < 0:
        raise ValueError(f"--check-splits must be >= 0, got {a.check_splits}")
    if not 0.0 <= a.draft_vocab_coverage <= 1.0:
        raise ValueError(f"--draft-vocab-coverage must be a share in [0, 1], got {a.draft_vocab_coverage}")
    if sum(map(bool, (a.data_path, a.input, a.prompts))) != 1:  # before the model loads
        raise ValueError("give exactly one of --data-path PREFIX, --input F.jsonl and --prompts F.jsonl")
    directory = resolve_checkpoint_dir(a.load)
    model, tok = load_checkpoint(a.load, device=a.device, dtype=torch.bfloat16 if a.bf16 else None)
    if not model.config.exit_layer_nums:
        raise ValueError(f"--load {a.load}: the checkpoint has no exits")
    if a.measure == "learned" and any(h.confidence is None for h in model.exits.values()):
        raise ValueError(
            "--measure learned needs confidence probes on every exit (add_exits.py --use-exit-confidence-head)"
        )
    if a.prompts:
        scores, data = answer_scores(a, model, tok)
    else:
        chunks = load_chunks(a, tok).to(a.device)
        scores = calibration.teacher_forced_scores(model, chunks, a.measure, a.batch_size)
        data = {"source": a.input or " ".join(a.data_path) + f" (split {a.split}, validation part)",
                "num_chunks": int(chunks.shape[0]), "chunk_length": a.seq_length, "seed": a.seed}  # fmt: skip
    vocab, drafts = model.config.real_vocab_size or model.config.vocab_size, None
    if a.draft_vocab_coverage > 0:
        drafts = calibration.draft_vocabulary(scores, vocab, a.draft_vocab_coverage)
    restricted = drafts is not None and not get_measure(a.measure).needs_vocab
    if restricted:
        # greedy decoding then chooses leaving tokens (and drafts) from the draft vocabulary alone
        # (`GenerationSettings.exit_vocabulary` "auto"): a final-head token outside it counts as a
        # disagreement at every exit, so the guarantee holds for those exits too
        scores = calibration.within_vocabulary(scores, drafts["tokens"])
    cal = calibration.calibrate(scores, a.delta, a.epsilon, a.path, a.steps, a.fit_fraction, a.seed, a.bound)
    agreement = {str(e): share for e, share in calibration.exit_agreement(scores).items()}
    record = {
        **cal.as_dict(), "measure": a.measure, "delta": a.delta, "epsilon": a.epsilon, "agreement": agreement,
        "bound": a.bound,
        "method": f"{calibration.BOUNDS[a.bound]} p-values on i.i.d. per-chunk disagreement, fixed-sequence testing, "
                  f"{a.path} path",
        "calibration_data": data,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip
    shown = ("thresholds", "risk", "exit_share", "p_value", "lambda_index", "agreement")
    print(json.dumps({k: record[k] for k in shown}))
    if a.check_splits:
        check = calibration.check_splits(
            scores, a.delta, a.epsilon, a.check_splits, a.check_test_fraction, a.path, a.steps, a.fit_fraction, a.seed,
            a.bound,
        )  # fmt: skip
        print("\n".join(split_lines(check)))
        record["split_check"] = check.as_dict()
    if a.draft_vocab_coverage > 0:
        print(draft_vocabulary_line(drafts, vocab, a.draft_vocab_coverage))
        if drafts is not None:
            record["draft_vocabulary"] = drafts
            record["exit_vocabulary"] = "draft" if restricted else "full"
    if not a.dry_run:
        write_into_checkpoint(directory, record)
        print(f"wrote {directory}/early_exit_thresholds.json and its README.md model card")
    return record


def main(argv: list[str] | None = None) -> None:
    run_tool(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
