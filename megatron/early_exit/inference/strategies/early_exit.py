"""`early_exit`: after each allowed exit, each sequence whose confidence reaches the threshold
takes that exit's token (measure: the request's, else `default_measure`: learned where the
exits carry probes, else max_prob); the others go deeper (per sequence; pending K/V are filled later by
the pass machinery). `exit_policy` cost_aware lets them leave only where that saves time at the
pass's size (inference/exit_decision.py). On the pipeline engine this is EE-LLM's pipeline early
exit, always exact."""

from megatron.early_exit.inference.confidence import get_measure
from megatron.early_exit.inference.passes import ExitPolicy
from megatron.early_exit.inference.settings import default_measure, greedy_tokens
from megatron.early_exit.inference.strategies.base import Strategy


class EarlyExit(Strategy):
    name = "early_exit"
    pipeline = True

    def policy(self, engine, s, allowed: list[int]) -> ExitPolicy:
        if not allowed and engine.exits and s.min_exit_layer is not None:  # else it decodes as `full`, silently
            raise ValueError(
                f"min_exit_layer {s.min_exit_layer}: no allowed exit at or above it (this model's exits: "
                f"{', '.join(map(str, engine.exits))}), so no token could leave early"
            )
        measure = s.measure if s.measure is not None else default_measure(engine.config)
        if get_measure(measure).needs_probe:
            engine.check_probes(allowed, measure)
        per_exit = s.exit_thresholds or {}
        if set(per_exit) - set(engine.exits):
            raise ValueError(f"exit_thresholds: {sorted(per_exit)} are not all exits of this model")
        pairs = tuple(sorted((int(n), float(t)) for n, t in per_exit.items()))
        # The pipeline engine pays no recompute (later stages fill K/V) and frees stage 0 with each exit: exact.
        mode = "exact" if getattr(engine, "specs", None) is not None else s.exit_policy
        threshold, vocab = float(s.early_exit_threshold), exit_vocabulary(engine, s, measure)
        return ExitPolicy(tuple(allowed), threshold, measure, per_exit=pairs, mode=mode, vocab=vocab)


def exit_vocabulary(engine, s, measure: str) -> str:
    """What leaving tokens are chosen from (`GenerationSettings.exit_vocabulary` resolved):
    "draft" (the engine's draft vocabulary, `Passes.draft_vocab`) or "full"."""
    has = getattr(getattr(engine, "passes", None), "draft_vocab", None) is not None  # a pipeline engine has none
    decides_alone = not get_measure(measure).needs_vocab  # else the check projects onto the vocabulary anyway
    if s.exit_vocabulary == "auto":
        return "draft" if has and decides_alone and greedy_tokens(s) else "full"
    if s.exit_vocabulary == "draft" and not has:
        raise ValueError(
            "exit_vocabulary draft: this engine has no draft vocabulary (the checkpoint's calibration record has "
            "none: tools/eval/calibrate_thresholds.py --draft-vocab-coverage; or a pipeline / tensor-parallel engine)"
        )
    if s.exit_vocabulary == "draft" and not decides_alone:
        raise ValueError(
            f"exit_vocabulary draft: the measure {measure} projects onto the whole vocabulary to decide; "
            "use learned (confidence probes)"
        )
    return s.exit_vocabulary
