"""lm-evaluation-harness model `megatron-ee`: any harness task on an early-exit checkpoint, in process.

    python -m megatron.early_exit.eval --model megatron-ee \\
        --model_args load=CKPT,strategy=early_exit,threshold=0.8 --tasks TASKS --batch_size 8

lm-eval (0.4.13) finds models only in its own registry: it reads no entry points. Importing
this module registers `megatron-ee` there, so `python -m megatron.early_exit.eval` is lm-eval's
own CLI with this module imported, and from Python:

    import megatron.early_exit.eval.lm_eval_model  # registers "megatron-ee"
    lm_eval.simple_evaluate(model="megatron-ee", model_args="load=CKPT,strategy=early_exit", tasks=[...])

model_args: load (checkpoint directory, HF model directory or .gguf file), strategy (full,
early_exit, self_speculative), threshold, measure, exit_layers (e.g. "1;2"), draft_exit_layer,
num_draft_tokens, dtype (float32, bfloat16), device, max_length, max_gen_toks.

How early exit scores text (loglikelihood, loglikelihood_rolling): the continuation is fed
to the decoder one token at a time (teacher forcing) under the exit policy, so each token's
log-probability comes from the head the early-exit decoder would have sampled it from after
exactly the tokens before it. As in generation, the first continuation token comes from the
prefill, which runs every layer. `full` and `self_speculative` (whose output is the final
model's) score with the final head in one pass, as the server's echo scoring does.

Exit telemetry (tokens, average exit layer, early-exit share, share per exit; per request type
and overall) lands in the results under `config.early_exit`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter

import lm_eval.models  # noqa: F401  (lm-eval loads its own models only into an empty registry: first)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from megatron.early_exit.inference import STRATEGIES, EarlyExitEngine, GenerationSettings

log = logging.getLogger(__name__)

DEFAULT_BATCH = 8  # for --batch_size auto
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@register_model("megatron-ee", "megatron_ee")
class EarlyExitLM(TemplateLM):
    """An lm-eval model over `EarlyExitEngine`: batched scoring and generation with early exit."""

    def __init__(
        self,
        load: str | None = None,
        strategy: str = "early_exit",
        threshold: float = 0.8,
        measure: str | None = None,  # None: learned where the exits have probes, else max_prob
        exit_layers: str | int | None = None,
        draft_exit_layer: int | None = None,
        num_draft_tokens: int = 4,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        model=None,
        tokenizer=None,
        **unused,
    ) -> None:
        super().__init__()
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
        model, tokenizer = _load(load, model, tokenizer, dtype, _device(device))
        self.engine = EarlyExitEngine(model, tokenizer)
        self.tokenizer = tokenizer
        self.settings = GenerationSettings(
            strategy=strategy,
            early_exit_threshold=float(threshold),
            measure=measure,
            exit_layers=_parse_layers(exit_layers),
            draft_exit_layer=None if draft_exit_layer is None else int(draft_exit_layer),
            num_draft_tokens=int(num_draft_tokens),
        )
        # bad exit settings fail here, naming the setting (lengths are checked per batch)
        self.engine.check(_with(self.settings, max_new_tokens=0), [[tokenizer.eod]])
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = DEFAULT_BATCH if auto else int(batch_size)
        self.max_length = int(max_length or model.config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.exits: dict[str, Counter] = {k: Counter() for k in ("loglikelihood", "loglikelihood_rolling", "generate")}

    # ----- tokenizer -----------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.tokenize(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    # ----- scoring -------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, kind: str = "loglikelihood"):
        """requests: ((context, continuation), context ids, continuation ids) -> (log-prob, is_greedy)."""
        pairs = [self._fit(ctx, cont) for _, ctx, cont in requests]
        order = sorted(range(len(pairs)), key=lambda i: -sum(map(len, pairs[i])))  # similar lengths batch together
        answers: list = [None] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="scoring"):
            chunk = order[start : start + self.batch_size]
            for i, ans in zip(chunk, self._score([pairs[i] for i in chunk], kind)):
                answers[i] = ans
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
        return answers

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Keep the newest tokens so that what is fed, context + continuation without its last
        token (only ever a target), fits max_length; at least one context token stays."""
        if not cont or not ctx:
            raise ValueError("loglikelihood: the context and the continuation need a token each")
        cont = cont[-self.max_length :]
        return ctx[-(self.max_length + 1 - len(cont)) :], cont

    def _score(self, batch: list[tuple[list[int], list[int]]], kind: str) -> list[tuple[float, bool]]:
        if self.settings.strategy == "early_exit":
            rows, layers = self._teacher_forced(batch)
        else:
            rows, layers = self._one_pass(batch), [[self.engine.num_layers] * len(c) for _, c in batch]
        out = []
        for (_, cont), logits, lay in zip(batch, rows, layers):
            logp = torch.log_softmax(logits.float(), -1)  # (C, V)
            target = torch.tensor(cont, device=logp.device)
            total = float(logp.gather(-1, target[:, None]).sum())
            out.append((total, bool((logp.argmax(-1) == target).all())))
            self.exits[kind].update(lay)
        return out

    def _one_pass(self, batch) -> list[torch.Tensor]:
        """Final-head logits predicting each continuation token, every row in one pass: [(C, V)]."""
        state = self.engine.new_state(len(batch), max(len(c) + len(x) for c, x in batch))
        out = self.engine.verify(state, {b: (c + x)[:-1] for b, (c, x) in enumerate(batch)})
        return [out.all_logits[b][len(c) - 1 : len(c) + len(x) - 1] for b, (c, x) in enumerate(batch)]

    def _teacher_forced(self, batch) -> tuple[list[torch.Tensor], list[list[int]]]:
        """Prefill the contexts, then feed the continuations a token per step under the exit
        policy; the logits and exit layer each step produced for each continuation token."""
        # max_new_tokens 0: the whole text is given (check() would reserve room for new tokens)
        policy = self.engine.check(_with(self.settings, max_new_tokens=0), [(c + x)[:-1] for c, x in batch])
        state = self.engine.new_state(len(batch), max(len(c) + len(x) for c, x in batch))
        out = self.engine.prefill(state, {b: c for b, (c, _) in enumerate(batch)})
        logits: list[list[torch.Tensor]] = [[] for _ in batch]
        layers: list[list[int]] = [[] for _ in batch]
        for j in range(max(len(x) for _, x in batch)):
            for b in out.logits:
                logits[b].append(out.logits[b])
                layers[b].append(out.exit_layer[b])
            feed = {b: x[j] for b, (_, x) in enumerate(batch) if j + 1 < len(x)}
            if not feed:
                break
            out = self.engine.decode_one_token(state, feed, policy)
        return [torch.stack(rows) for rows in logits], layers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of max_length tokens (each window
        conditioned on the tokens before it, the first on the end-of-text token)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            tokens = self.tok_encode(text)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(tokens, self.eot_token_id,
                                                                                self.max_length, 1)):  # fmt: skip
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm, kind="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, scores):
            totals[i] += lp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ----- generation ----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with equal generation settings, decoded together."""
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        texts: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generating")
        for idx in groups.values():
            settings = self._generation_settings(requests[idx[0]].args[1])
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                for i, text in zip(chunk, self._generate([requests[i].args[0] for i in chunk], settings)):
                    texts[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return texts

    def _generation_settings(self, kwargs: dict) -> GenerationSettings:
        """lm-eval's gen_kwargs (until, max_gen_toks, do_sample, temperature, top_k, top_p) over
        the model's exit settings."""
        kwargs = dict(kwargs or {})
        until = kwargs.get("until") or []
        sample = bool(kwargs.get("do_sample", False))
        return _with(
            self.settings,
            max_new_tokens=int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", self.max_gen_toks))),
            temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
            top_k=int(kwargs.get("top_k") or 0),
            top_p=float(kwargs.get("top_p") or 1.0),
            stop_strings=(until,) if isinstance(until, str) else tuple(until),
        )

    def _generate(self, contexts: list[str], s: GenerationSettings) -> list[str]:
        keep = max(1, self.max_length - s.max_new_tokens)
        prompts = [(self.tok_encode(c) or [self.eot_token_id])[-keep:] for c in contexts]
        results = self.engine.generate(prompts, s)
        for r in results:
            self.exits["generate"].update(r.exit_layers)
        return [r.text for r in results]

    # ----- telemetry -----------------------------------------------------------------------

    def get_model_info(self) -> dict:
        """Added to the results' `config` by lm-eval after the run: settings and exit telemetry."""
        s, n = self.settings, self.engine.num_layers
        info = {
            "strategy": s.strategy,
            "threshold": s.early_exit_threshold,
            "measure": s.measure,
            "model_exits": list(self.engine.exits),
            "num_layers": n,
        }
        for kind, counts in self.exits.items():
            if counts:
                info[kind] = exit_summary(counts, n)
        info["all"] = exit_summary(sum(self.exits.values(), Counter()), n)
        return {"early_exit": info}


def exit_summary(counts: Counter, num_layers: int) -> dict:
    """Tokens, average exit layer, share of tokens that left before the last layer, share per layer."""
    total = sum(counts.values())
    if not total:
        return {"tokens": 0, "average_exit_layer": None, "early_exit_share": 0.0, "exit_share": {}}
    return {
        "tokens": total,
        "average_exit_layer": sum(n * c for n, c in counts.items()) / total,
        "early_exit_share": sum(c for n, c in counts.items() if n < num_layers) / total,
        "exit_share": {str(n): counts[n] / total for n in sorted(counts)},
    }


def _with(s: GenerationSettings, **changes) -> GenerationSettings:
    return GenerationSettings(**{**vars(s), **changes})


def _parse_layers(value) -> tuple[int, ...] | None:
    """exit_layers from model_args: an int, or layer numbers separated by ';' or spaces."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return (value,)
    try:
        return tuple(int(v) for v in str(value).replace(";", " ").split())
    except ValueError:
        raise ValueError(f"exit_layers: expected layer numbers separated by ';', got {value!r}") from None


def _device(name: str | None) -> str:
    """lm-eval's CLI asks for "cuda" by default; like its own hf model, fall back to the CPU."""
    if not name:
        return "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s is not available: running on the CPU", name)
        return "cpu"
    return name


def _load(load, model, tokenizer, dtype: str, device: str):
    """(model, tokenizer): given objects, or loaded from `load` (any format the server takes)."""
    if model is not None:
        if tokenizer is None:
            raise ValueError("megatron-ee: pass tokenizer= together with model=")
        return model.eval(), tokenizer
    if not load:
        raise ValueError("megatron-ee: model_args needs load=CHECKPOINT (a checkpoint, HF directory or .gguf file)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    from megatron.early_exit.conversion import load_model

    model, tokenizer, _ = load_model(load, None, DTYPES[dtype])
    if tokenizer is None:
        raise ValueError(f"load: {load} has no tokenizer")
    return model.to(device).eval(), tokenizer
