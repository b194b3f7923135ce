"""EE-Tuning stage 1: add exit heads to a trained model.

Copy initialisation (default) starts every new exit from the backbone's own tensors:

- exit norm            <- the final norm (`decoder.final_layernorm`)
- exit MLP + mlp_norm  <- the MLP and pre-MLP norm of the layer the exit sits on
- exit block           <- the last transformer layer
- untied exit output   <- the output layer (the word embedding when the output is tied)
- confidence head      <- zeros (a probe with nothing to copy; sigmoid(0) = 0.5); an MLP probe
                          (`exit_confidence_hidden_size` k > 0) draws its first layer from
                          N(0, std) and zeros its last, so it too starts at 0.5 yet can learn
                          (an all-zero MLP has no gradient)
- probe norm           <- the final norm (`confidence_norm`, `exit_confidence_input="backbone"`)

so a norm exit after the last layer *is* the final head, and an MLP exit begins as one
more MLP sub-block of its layer. `random_init` instead draws N(0, std) for weight
matrices, ones for norm weights and zeros for biases (the confidence head as above).

`replace_probes` gives every existing exit a fresh probe of another shape (say an MLP
probe for a model pretrained with linear ones); the rest of the model is kept bit for bit.
`untie_exits` gives every existing exit its own output projection, a copy of the one it shared
(so the model's outputs are unchanged until tuning moves it): a norm-only exit has nothing but
its norm's gains to tune, and an exit of its own can learn the final head's distribution
(the CPU reference model's exit 3 went from 76.7% to 82.0% agreement with the final head on
its summaries, distilled from the activation cache: examples/ee_training/cpu_pretrain_aclsum.sh).

The probe norm copies the final norm, like the exit norm, because the backbone's hidden state
is the final norm's kind of input: its per-feature scales already damp the residual stream's
few very large features, which an all-ones norm would hand to the probe undamped. For an exit
that is a copied norm alone, a backbone-mode probe then starts reading exactly what an
exit-mode probe reads. (The probe's weights start at zero, so the norm only shapes how the
probe learns, not its first outputs.)

Existing exits are kept unchanged. Structure flags (norm / MLP / block / untied output /
confidence head) are global in `ModelConfig`, so when the model already has exits the
new ones must use the same structure; flags left as None inherit it.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import torch

from megatron.early_exit.config import ModelConfig
from megatron.early_exit.conversion.common import ConversionError, build_model, model_weights

STRUCTURE_FLAGS = {
    "use_exit_norm": "--use-exit-norm",
    "use_exit_mlp": "--use-exit-mlp",
    "use_exit_block": "--use-exit-block",
    "untie_exit_output_weights": "--untie-exit-output-weights",
    "use_exit_confidence_head": "--use-exit-confidence-head",
}


def _is_norm(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return "norm" in module


def _probe_tensor(name: str, like: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """A new probe tensor: N(0, std) for an MLP probe's first matrix, zeros for the rest, so
    every new probe starts at sigmoid(0) = 0.5."""
    if name.endswith(".confidence.fc_in.weight"):
        return (torch.randn(like.shape, generator=gen) * std).to(like.dtype)
    return torch.zeros_like(like)


def _random_tensor(name: str, like: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    if name.endswith(".bias"):
        return torch.zeros_like(like)
    if _is_norm(name):
        return torch.ones_like(like)
    return (torch.randn(like.shape, generator=gen) * std).to(like.dtype)


def _copy_source(name: str, layer_number: int, config: ModelConfig) -> str:
    """The backbone tensor a new exit tensor `exits.{n}.<rest>` is copied from (probes aside)."""
    rest = name.split(".", 2)[2]
    if rest.startswith("norm."):
        return "decoder.final_layernorm." + rest[len("norm.") :]
    if rest.startswith("confidence_norm."):
        return "decoder.final_layernorm." + rest[len("confidence_norm.") :]
    if rest.startswith("mlp_norm."):
        return f"decoder.layers.{layer_number - 1}.pre_mlp_layernorm." + rest[len("mlp_norm.") :]
    if rest.startswith("mlp."):
        return f"decoder.layers.{layer_number - 1}.{rest}"
    if rest.startswith("block."):
        return f"decoder.layers.{config.num_layers - 1}." + rest[len("block.") :]
    if rest == "output_layer.weight":
        if config.untie_embeddings_and_output_weights:
            return "output_layer.weight"
        return "embedding.word_embeddings.weight"
    raise ConversionError(f"add_exits: do not know how to initialise {name}")


def _set_probe_input(old: ModelConfig, new: ModelConfig, probe_input: str | None) -> None:
    """`--exit-confidence-input` onto `new` (None: keep the model's); one value for all exits."""
    if probe_input is None:
        return
    if probe_input not in ("exit", "backbone"):
        raise ConversionError(f"--exit-confidence-input must be exit or backbone, got {probe_input!r}")
    if old.exit_layer_nums and probe_input != old.exit_confidence_input:
        raise ConversionError(
            f"--exit-confidence-input: the model's existing exits (layers {old.exit_layer_nums}) have "
            f"exit_confidence_input={old.exit_confidence_input!r}; all exits share one structure"
        )
    if probe_input == "backbone" and not new.use_exit_confidence_head:
        raise ConversionError("--exit-confidence-input backbone needs --use-exit-confidence-head")
    new.exit_confidence_input = probe_input


def _set_probe_size(old: ModelConfig, new: ModelConfig, size: int | None) -> None:
    """`--exit-confidence-hidden-size` onto `new` (None: keep the model's); one value for all exits."""
    if size is None:
        return
    if not 0 <= size <= 65536:
        raise ConversionError(f"--exit-confidence-hidden-size must be in 0..65536, got {size}")
    if old.exit_layer_nums and size != old.exit_confidence_hidden_size:
        raise ConversionError(
            f"--exit-confidence-hidden-size: the model's existing exits (layers {old.exit_layer_nums}) have "
            f"exit_confidence_hidden_size={old.exit_confidence_hidden_size}; all exits share one structure "
            "(--replace-probes gives every exit a new probe)"
        )
    if size and not new.use_exit_confidence_head:
        raise ConversionError("--exit-confidence-hidden-size needs --use-exit-confidence-head")
    new.exit_confidence_hidden_size = size


def _check_layers(old: ModelConfig, layer_nums: list[int]) -> list[int]:
    """The requested exit layers as ints, or ConversionError naming --add-exit-layer-nums."""
    if not layer_nums:
        raise ConversionError("--add-exit-layer-nums: give at least one layer")
    wanted = [int(n) for n in layer_nums]
    for n in wanted:
        if not 1 <= n <= old.num_layers:
            raise ConversionError(f"--add-exit-layer-nums: layer {n} is outside 1..{old.num_layers}")
        if n in old.exit_layer_nums:
            raise ConversionError(f"--add-exit-layer-nums: layer {n} already has an exit")
    if len(set(wanted)) != len(wanted):
        raise ConversionError("--add-exit-layer-nums: a layer is given twice")
    return wanted


def _new_config(old: ModelConfig, wanted: list[int], given: dict, probe: tuple, temperature: float):
    """`old` with the new exits: structure flags from `given` and the probe's (input, hidden
    size) from `probe` (None: keep), which must match the model's existing exits; the new
    exits' temperature."""
    new = copy.deepcopy(old)
    for key, value in given.items():
        current = getattr(old, key)
        if old.exit_layer_nums:
            if value is not None and bool(value) != current:
                raise ConversionError(
                    f"{STRUCTURE_FLAGS[key]}: the model's existing exits (layers {old.exit_layer_nums}) have "
                    f"{key}={current}; all exits share one structure"
                )
        else:
            setattr(new, key, bool(value))
    _set_probe_input(old, new, probe[0])
    _set_probe_size(old, new, probe[1])
    if old.untie_embeddings_and_output_weights and not new.untie_exit_output_weights:
        warnings.warn(
            "the model's output layer is untied but the exits are tied: they project with the input "
            "embedding (pass --untie-exit-output-weights to copy the output layer instead)",
            stacklevel=3,
        )
    temps = dict(zip(old.exit_layer_nums, old.exit_layer_temperature))
    temps.update({n: float(temperature) for n in wanted})
    new.exit_layer_nums = sorted(temps)
    new.exit_layer_temperature = [temps[n] for n in new.exit_layer_nums]
    return new


def _init_new_exits(weights: dict, new: ModelConfig, old: ModelConfig, wanted, random_init: bool, std, seed) -> None:
    """Add the new exits' tensors to `weights`: copies of their source (zeros for the probe's
    linear), or random draws with `random_init`."""
    from megatron.early_exit.model import EarlyExitGPT

    try:  # the target model on the meta device, only to learn the new exits' names and shapes
        new.validate()
        with torch.device("meta"):
            shapes = {k: v for k, v in EarlyExitGPT(new).state_dict().items()}
    except ValueError as e:
        raise ConversionError(f"--add-exit-layer-nums: {e}") from None
    gen = torch.Generator().manual_seed(seed)
    dtype = next(iter(weights.values())).dtype
    for name in sorted(shapes):  # sorted: the random draws do not depend on module order
        if name in weights:
            continue
        n = int(name.split(".")[1])
        if n not in wanted:
            raise ConversionError(f"add_exits: existing exit tensor {name} is missing from the model")
        like = torch.empty(shapes[name].shape, dtype=dtype)
        if ".confidence." in name:  # a probe: the same under copy and random initialisation
            weights[name] = _probe_tensor(name, like, std, gen)
        elif random_init:
            weights[name] = _random_tensor(name, like, std, gen)
        else:
            weights[name] = weights[_copy_source(name, n, old)].clone()


def add_exits(
    model,
    layer_nums: list[int],
    *,
    use_exit_norm: bool | None = None,
    use_exit_mlp: bool | None = None,
    use_exit_block: bool | None = None,
    untie_exit_output_weights: bool | None = None,
    use_exit_confidence_head: bool | None = None,
    exit_confidence_input: str | None = None,
    exit_confidence_hidden_size: int | None = None,
    random_init: bool = False,
    init_method_std: float | None = None,
    seed: int = 1234,
    temperature: float = 1.0,
):
    """Return a new EarlyExitGPT: `model` plus exits after the given layers (1-based).

    Raises ConversionError (naming the flag) for a layer out of range, a layer that already
    has an exit, or structure flags that contradict the model's existing exits.
    """
    old: ModelConfig = model.config
    wanted = _check_layers(old, layer_nums)
    given = {
        "use_exit_norm": use_exit_norm,
        "use_exit_mlp": use_exit_mlp,
        "use_exit_block": use_exit_block,
        "untie_exit_output_weights": untie_exit_output_weights,
        "use_exit_confidence_head": use_exit_confidence_head,
    }
    probe = (exit_confidence_input, exit_confidence_hidden_size)
    new = _new_config(old, wanted, given, probe, temperature)
    std = float(init_method_std if init_method_std is not None else old.init_method_std)
    if (random_init or new.exit_confidence_hidden_size) and std <= 0:
        raise ConversionError(f"--init-method-std must be > 0, got {std}")
    weights = model_weights(model)
    _init_new_exits(weights, new, old, wanted, random_init, std, seed)
    return build_model(new, weights, "add_exits", next(iter(weights.values())).dtype)


def replace_probes(
    model,
    exit_confidence_hidden_size: int,
    *,
    exit_confidence_input: str | None = None,
    init_method_std: float | None = None,
    seed: int = 1234,
):
    """Return a new EarlyExitGPT: `model` with every exit's confidence probe (and probe norm)
    replaced by a new one of the given shape, initialised as `add_exits` initialises probes;
    every other tensor is kept. The model must already have exits."""
    old: ModelConfig = model.config
    if not old.exit_layer_nums:
        raise ConversionError("--replace-probes: the model has no exits (add them with --add-exit-layer-nums)")
    new = copy.deepcopy(old)
    new.use_exit_confidence_head = True
    bare = dataclasses.replace(old, exit_layer_nums=[], exit_layer_temperature=[])  # no exits to agree with
    _set_probe_input(bare, new, exit_confidence_input)
    _set_probe_size(bare, new, exit_confidence_hidden_size)
    std = float(init_method_std if init_method_std is not None else old.init_method_std)
    if std <= 0:
        raise ConversionError(f"--init-method-std must be > 0, got {std}")
    weights = {k: v for k, v in model_weights(model).items() if ".confidence" not in k}
    _init_new_exits(weights, new, old, list(old.exit_layer_nums), False, std, seed)
    return build_model(new, weights, "replace_probes", next(iter(weights.values())).dtype)


def untie_exits(model):
    """Return a new EarlyExitGPT: `model` with every exit projecting with an output layer of its
    own, a copy of the weight it shared (`tied_output_weight`: the word embedding, also where
    the model's own output layer is untied), so every logit stays as it was; every other tensor
    is kept. The model must have exits that share the projection."""
    old: ModelConfig = model.config
    if not old.exit_layer_nums:
        raise ConversionError("--untie-exits: the model has no exits (add them with --add-exit-layer-nums)")
    if old.untie_exit_output_weights:
        raise ConversionError("--untie-exits: the model's exits already have their own output layers")
    new = copy.deepcopy(old)
    new.untie_exit_output_weights = True
    weights = model_weights(model)
    shared = model.tied_output_weight().detach()
    for n in old.exit_layer_nums:
        weights[f"exits.{n}.output_layer.weight"] = shared.clone()
    return build_model(new, weights, "untie_exits", shared.dtype)
