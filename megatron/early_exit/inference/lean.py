"""Decoding's layers in as few tensor operations as possible.

A decode step at small batch streams every weight once, and on a CPU what a layer does besides
its four products costs more than their arithmetic suggests: each operation pays the
dispatcher and the interpreter, and pays them cold, because the product before it has just
pushed the layer's megabytes through the caches. Measured on the Intel Xeon (2 threads, fp32):
a tensor view costs 1 us in a warm loop and 16 us right after a 3072x576 product, an RMSNorm
13 us and 86 us. Module calls, `F.dropout` in eval, the grouped-query reshape copy of the
query heads, the kernel dispatch of `packed.packed_linear` and rotate-half's `cat` and `neg`
are such operations: SmolLM2-135M ran ~150 of them per layer.

`LeanLayer` runs one Llama-style layer (RMSNorm, rotary positions, grouped-query attention,
SwiGLU, no biases) over one row per sequence (`__call__`: uniform decode steps,
`Passes.decode_layer`) or R rows per sequence (`rows`: prefills, pending-row fills, verification;
`Passes.advance`) with the modules' arithmetic, in their order (attention through the same SDPA
call the modules make), so that it gives the same numbers and the same K/V bit for bit
(`tests/test_lean.py`), with fewer operations:
  - q and k heads rotated together, as a view of the fused QKV product; rotate-half as a roll
    times a sine whose first half is negated (the same products and sums: -a*s == a*(-s));
  - in decode steps the query heads of each group attend as that group's rows, straight from
    the product's view (no reshape copy), as `SelfAttention.one_query_attention` does;
  - the products on the kernels `packed.PackedWeights` would choose (`kernels.linear`), looked
    up once per pass and weight shape (`LeanKernels`), without its per-call checks (a pass runs
    without autograd in the weights' dtype); `F.linear` where the engine's packing is off;
  - on the native kernel (`native.py`), the norm before a product, SwiGLU before the last and
    the residual adds after two folded into the product's call (`LeanKernels.folded`): the
    same roundings, the norm's mean and the sigmoid's exp within round-off of torch's, so bit
    for bit only on the other kernels; the rotary positions applied in place to the QKV product
    (`native.rope_`); attention in one native call (`native.attend`, within round-off of SDPA)
    in decode steps and in general passes of up to ATTEND_ROWS rows per sequence (verify
    passes; up to FOLD_ROWS in the one call below), a prompt's where it measured faster than
    SDPA (`kernels.prompt_attention`); and where all four products of a decode
    step run natively, the whole step in one call (`native.layer_step`: the same operations in
    the same order, so the same numbers as these calls, without their ~45 tensor operations a
    layer: SmolLM2 decoded 1.06x faster in fp32 and 1.17x in bf16, the CPU reference model
    1.28x and 1.37x), and a decode step's run of such layers up to its next stop in one call
    (`native_run`, `Passes.decode_layers`: the Python between layers, ~60 us a layer paid cold,
    once a run; full decoding of the CPU reference model 1.22x faster in bf16, 1.12x in fp32);
  - no dtype casts where the model is fp32 (the norms' and rotation's fp32 math is its own).
Anything else (biases, QK-norm, LayerNorm, GELU, tensor-parallel modules) runs the modules, and
so does a layer with a forward hook on it or inside it (the hook sees the calls it expects).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module

from megatron.early_exit.inference import kernels, native
from megatron.early_exit.model.attention import group_rows_attention
from megatron.early_exit.model.layer import TransformerLayer
from megatron.early_exit.model.mlp import MLP
from megatron.early_exit.model.norm import RMSNorm

# The folded operations run in the calling thread before the product's threads start, vectorised
# (an exact GELU-free SiLU through `exp16`): at 8 rows (SmolLM2, batch 8) decoding ran 1.015x
# faster with them (fp32 and bf16), at 1 row 1.046x; a verify pass of 5 rows (CPU reference model,
# bf16) cost 0.1-0.2 of a plain step less than with the torch operations. Up to 64 rows: on AMX
# (bf16 products of 16 rows at ~1.4x one row's time) a self-speculative round of 4 drafts at batch 4
# (a verify pass of 20 rows, CPU reference model) took 7.6 ms where at 16 its verify pass ran the
# torch operations layer by layer and the round took 12.4; past the native kernel's bucket of many
# rows (`kernels`: measured at 32) another kernel may be chosen, and the layers run as before.
# Up to 256 (stop 60): a prompt of up to 256 tokens runs each layer in one native call too (its
# norms, rotary positions, SwiGLU and residuals folded in, where the torch operations between the
# products had cost a 160-token prefill of the CPU reference model ~6 of its ~18 ms in bf16); the
# kernel choice's bucket of 65-256 rows (`kernels`) weighs the one-call layer as up to 64.
FOLD_ROWS = 256
# A general pass whose layer runs its operations one by one attends natively up to this many rows
# per sequence (verify passes, pending rows); a prompt's many rows attend natively where the
# measured choice says so (`kernels.prompt_attention`: on the AMD EPYC 0.60-0.88x SDPA's time from
# 64 to 1024 rows, where on the Intel Xeon SmolLM2's fp32 prefill of ~200-token prompts had been
# 1.08x slower), else through SDPA. A layer in one native call (`native_step`, `native_run`: up to
# FOLD_ROWS rows in all) attends its rows in that call, a prompt's too (each row's keys end at its
# own position, `ee_attend`, so a causal prompt computes half the scores; bf16 on the CPU reference
# model ~0.15 ms a layer at 160 rows against SDPA's ~0.24).
ATTEND_ROWS = 16


def supports(layer: nn.Module) -> bool:
    """Whether `LeanLayer` can run `layer` with the modules' arithmetic."""
    if type(layer) is not TransformerLayer:
        return False
    attn, mlp = layer.self_attention, layer.mlp
    linears = (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2)
    return (
        type(layer.input_layernorm) is RMSNorm
        and type(layer.pre_mlp_layernorm) is RMSNorm
        and attn.q_layernorm is None
        and mlp.swiglu
        and all(type(m) is nn.Linear and m.bias is None for m in linears)
        and attn.num_heads % attn.num_groups == 0
        and attn.linear_qkv.weight.shape[0] == (attn.num_heads + 2 * attn.num_groups) * attn.head_dim
    )


def scaled_rows(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm's rows before its gain, in fp32: x * rsqrt(mean(x^2) + eps), x as fp32, the
    operations of `RMSNorm.forward` (its result is `weight * this`, cast back in 16-bit dtypes).
    An exit check whose probe reads the row through an RMSNorm of the same eps reads these too
    (`fused_check.FoldedProbe.scores_of_scaled`), and the next layer then takes them as made."""
    x32 = x if x.dtype == torch.float32 else x.float()  # `float()` is an identity in fp32, but a call
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, scaled: torch.Tensor | None = None) -> torch.Tensor:
    """`RMSNorm.forward` of x with gain `weight`, the same operations (no casts in fp32, where
    they are identities), without the module call (the lean layers', an exit's and the final
    norm: `Passes.norm`); `scaled`: `scaled_rows(x, eps)` made already (an exit's check read it:
    `Passes.folded_scores`)."""
    scaled = scaled_rows(x, eps) if scaled is None else scaled
    return weight * scaled if x.dtype == torch.float32 else weight * scaled.to(x.dtype)


def exit_norm(head: nn.Module) -> RMSNorm | None:
    """An exit's RMSNorm where the exit's hidden state is that norm of its input alone (no
    block, no MLP: `EarlyExit.hidden`), else None."""
    norm = getattr(head, "norm", None)
    plain = getattr(head, "block", None) is None and getattr(head, "mlp", None) is None
    return norm if plain and type(norm) is RMSNorm else None


class ExitMLP:
    """An exit's MLP sub-block (`ExitHead.hidden`: h + MLP(mlp_norm(h)), then its last norm, which
    the caller applies) as a lean layer's MLP half (`LeanLayer.finish`): two products, the norm
    folded into the first's call and SwiGLU and the residual into the second's on the native
    kernel (within round-off of the modules, as every lean layer there), the modules' operations
    on any other (bit for bit). A decode step leaving at a SmolLM2 exit (bf16, 2 threads) ran the
    modules' ~20 tensor operations and two module calls around its two products: ~0.4 ms."""

    def __init__(self, head: nn.Module) -> None:
        self.w, self.eps = head.mlp_norm.weight, head.mlp_norm.eps
        self.fc1, self.fc2 = head.mlp.linear_fc1.weight, head.mlp.linear_fc2.weight
        self.hooks = hook_dicts((head.mlp_norm, *head.mlp.modules()))

    def hooked(self) -> bool:
        """Whether a forward hook watches the norm or the MLP (then the modules run)."""
        return hooks_set(self.hooks)

    def __call__(self, x: torch.Tensor, linear: LeanKernels) -> torch.Tensor:
        """x (A, h) -> x + MLP(mlp_norm(x)) (A, h)."""
        return mlp_block(x, self.fc1, self.fc2, (self.w, self.eps), linear)


def mlp_block(x, fc1, fc2, norm: tuple, linear: LeanKernels, prepared=False) -> torch.Tensor:
    """x (N, h) plus the SwiGLU MLP (fc1's rows [gate; up], then fc2) of its RMSNorm `norm` (gain,
    eps): a lean layer's MLP half (`LeanLayer.finish`) and an MLP exit's (`ExitMLP`). `prepared`:
    `LeanKernels.folded`'s."""
    h = linear.folded(x, fc1, norm=norm, prepared=prepared)  # (N, 2 ffn)
    return linear.folded(h, fc2, swiglu=True, residual=x, prepared=prepared)


def exit_mlp(head: nn.Module) -> ExitMLP | None:
    """An exit's `ExitMLP` where its hidden state is an RMSNorm'd bias-free SwiGLU MLP sub-block
    of its input, then an RMSNorm or nothing (no block), else None."""
    mlp, norm = getattr(head, "mlp", None), getattr(head, "norm", None)
    if getattr(head, "block", None) is not None or type(mlp) is not MLP or not mlp.swiglu:
        return None
    plain = all(type(m) is nn.Linear and m.bias is None for m in (mlp.linear_fc1, mlp.linear_fc2))
    if not plain or type(head.mlp_norm) is not RMSNorm or (norm is not None and type(norm) is not RMSNorm):
        return None
    return ExitMLP(head)


def signed_sine(sin: torch.Tensor) -> torch.Tensor:
    """sin [.., hd] with its first half negated: rotate_half(x) * sin == x.roll(hd/2) * this."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


class LeanKernels:
    """The product function for each weight shape at one batch size, looked up once while what
    chooses kernels stays the same (`sync`): where the engine's packed kernels are on (CPU, fp32 or
    bf16, no autograd), the kernel `PackedWeights` would run (`kernels.linear_func`: forced, cached
    or measured now), else `F.linear`."""

    def __init__(self, packed: bool) -> None:
        self.packed = packed
        self.funcs: dict[tuple, object] = {}
        self.selection: tuple | None = None  # `kernels.selection()` when `funcs` were looked up

    def reset(self) -> None:
        self.funcs.clear()

    def sync(self) -> None:
        """Forget the kernels looked up where what chooses them changed (`kernels.selection`: a
        kernel forced, the environment, the threads) since they were: a pass asks this once, and
        looks each shape up once while nothing changes (5 lookups a step cost ~20-40 us)."""
        selection = kernels.selection()
        if selection != self.selection:
            self.funcs.clear()
            self.selection = selection

    def func(self, weight: torch.Tensor, rows: int):
        key = (weight.shape, rows)
        f = self.funcs.get(key)
        if f is None:
            f = self.funcs[key] = kernels.linear_func(weight, rows) if self.packed else F.linear
        return f

    def head_func(self, weight: torch.Tensor, rows: int):
        """`func` for a vocabulary head's weight (the final head's, an exit's, a draft vocabulary's
        rows), whose head runs in one native call on the native kernel (`native.head`: the norm,
        the product, the greedy token and its probability, and a round's drafts through the layers
        below the exit, `native.drafts`): its shape weighs that call as a layer's products do
        (`kernels.fuse`). Measured at the usual margin, the CPU reference model's draft rows
        (747 x 384, fp32, one row, 2 threads, Intel Xeon) took `F.linear` in three processes of
        three: every draft then stepped through Python and the verify pass took the general path,
        and a round of 4 drafts from exit 3 cost 2.9 plain steps where one native call makes it 2.1."""
        if self.packed and (weight.shape, rows) not in self.funcs:
            kernels.fuse((weight,))  # before `func` measures its kernel
        return self.func(weight, rows)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x (A, in) -> (A, out)."""
        return self.func(weight, x.shape[0])(x, weight, None)

    def all_native(self, weights: tuple, rows: int) -> bool:
        """Whether every weight's product over `rows` rows runs on the native kernel."""
        return all(kernels.is_native(self.func(w, rows)) for w in weights)

    def native_on(self, weight: torch.Tensor, rows: int) -> bool:
        """Whether `weight`'s product over `rows` rows runs on the native kernel (the layer's
        decode steps then attend natively too: `native.attend`)."""
        return kernels.is_native(self.func(weight, rows))

    def folded(self, x, weight, norm=None, swiglu: bool = False, residual=None, prepared=False) -> torch.Tensor:
        """residual + (the rows x made ready) @ weight.T, x (A, in) -> (A, out): made ready by
        `rms_norm(x, *norm)` or, with `swiglu`, `F.silu(gate) * up` of x = [gate | up]. On the
        native kernel, up to FOLD_ROWS rows, one call does it all (`native.linear`: the same roundings, the norm's mean
        and the sigmoid's exp within round-off of torch's); on any other, these operations, or with
        `prepared` (a general pass's native arithmetic, `LeanLayer.native_arithmetic`) the rows made
        ready in one native call (`native.prepared_rows`, the same numbers as `native.linear`'s). The
        residual is added by `native.add_` where it takes the rows (torch's `residual + y`, bit for bit)."""
        f = self.func(weight, x.shape[0])
        if x.shape[0] <= FOLD_ROWS:
            y = kernels.native_folded(f, x, weight, norm=norm, swiglu=swiglu, residual=residual)
            if y is not None:
                return y
        if prepared and (norm is not None or swiglu):  # made ready in one native call
            made = native.prepared_rows(x, norm, swiglu)
            if made is not None:
                x, norm, swiglu = made, None, False
        if norm is not None:
            x = rms_norm(x, *norm)
        if swiglu:
            half = x.shape[-1] // 2
            x = F.silu(x[:, :half]) * x[:, half:]
        y = f(x, weight, None)
        if residual is None:
            return y
        added = native.add_(y, residual)  # y is the product's own: in place, in one native call
        return residual + y if added is None else added


class LeanLayer:
    """One supported layer's weights, read once; `__call__` is its decode step, `rows` its general pass."""

    def __init__(self, layer: TransformerLayer) -> None:
        attn, mlp = layer.self_attention, layer.mlp
        self.w_in, self.eps_in = layer.input_layernorm.weight, layer.input_layernorm.eps
        self.w_mid, self.eps_mid = layer.pre_mlp_layernorm.weight, layer.pre_mlp_layernorm.eps
        self.qkv, self.proj = attn.linear_qkv.weight, attn.linear_proj.weight
        self.fc1, self.fc2 = mlp.linear_fc1.weight, mlp.linear_fc2.weight
        self.groups, self.per = attn.num_groups, attn.num_heads // attn.num_groups
        self.head_dim, self.ffn = attn.head_dim, mlp.linear_fc2.weight.shape[1]
        self.fp32 = self.qkv.dtype == torch.float32
        self.products = (self.qkv, self.proj, self.fc1, self.fc2)
        kernels.fuse(self.products)  # a kernel choice for their shapes weighs the one-call layer
        # Its modules' hook dicts (registering a hook adds to them in place), checked every step.
        self.hooks = hook_dicts(layer.modules())

    def hooked(self) -> bool:
        """Whether a forward hook watches the layer or a module in it (or every module): then the
        modules run, so that the hook sees their calls."""
        return hooks_set(self.hooks)

    def rotated_qkv(self, x, lead: tuple, cos, sin_signed, linear: LeanKernels, scaled=None, natively=False) -> tuple:
        """x (N, h) -> (qk, qkv): the QKV product of the normed rows viewed (*lead, g, per + 2, hd)
        (lead: (A,) or (A, R), N rows in all; per group: its query heads, key, value) and its q
        and k heads rotated (*lead, g, per + 1, hd), as `apply_rotary` does (in fp32, cast back).
        cos, sin_signed broadcast against them. `scaled`: the input norm's `scaled_rows` of x
        where an exit check made them. `natively`: rotated natively (`native.rope_`) even where the
        product is not native, the normed rows made ready natively too (`native_arithmetic`)."""
        g, per, hd = self.groups, self.per, self.head_dim
        if scaled is None:
            qkv = linear.folded(x, self.qkv, norm=(self.w_in, self.eps_in), prepared=natively)
        else:
            qkv = linear(rms_norm(x, self.w_in, self.eps_in, scaled), self.qkv)
        if natively or linear.native_on(self.qkv, x.shape[0]):  # rotated in place, one call (`native.rope_`)
            done = native.rope_(qkv.view(-1, g, per + 2, hd), cos, sin_signed, per + 1)
            if done is not None:
                qkv = qkv.view(*lead, g, per + 2, hd)
                return qkv[..., : per + 1, :], qkv
        qkv = qkv.view(*lead, g, per + 2, hd)
        qk = qkv[..., : per + 1, :]
        if self.fp32:
            return qk * cos + qk.roll(hd // 2, -1) * sin_signed, qkv
        q32 = qk.float()
        return (q32 * cos + q32.roll(hd // 2, -1) * sin_signed).to(x.dtype), qkv

    def finish(self, x: torch.Tensor, out: torch.Tensor, linear: LeanKernels, prepared=False) -> torch.Tensor:
        """x (N, h) plus the attention's output projected from out (N, heads x hd), then plus
        the SwiGLU MLP of the normed result: the layer's output (N, h). `prepared`: `LeanKernels.folded`'s."""
        x = linear.folded(out, self.proj, residual=x)
        return mlp_block(x, self.fc1, self.fc2, (self.w_mid, self.eps_mid), linear, prepared)

    def __call__(self, x, cos, sin_signed, attn_mask, view, linear: LeanKernels, scaled=None, probe=None):
        """x (A, 1, h) -> (A, 1, h); K/V written through `view` (a `kv_cache.DecodeView`).
        cos, sin_signed: (A or 1, 1, 1, hd) fp32 (`signed_sine`); attn_mask as the modules take it;
        scaled (A, h) fp32: `scaled_rows(x, self.eps_in)` where an exit's check made them already.
        `probe` (a `native.Probe` that takes the rows, or None): then (y, the probe's scores of y
        where the layer ran in one native call, else None)."""
        a, per = x.shape[0], self.per
        x = x.view(a, -1)  # (A, h): 2-D products take no reshapes around them
        if scaled is None and a <= FOLD_ROWS and linear.all_native(self.products, a):
            y = self.native_step(x, cos, sin_signed, view, probe)
            if y is not None:
                return y.view(a, 1, -1) if probe is None else (y[0].view(a, 1, -1), y[1])
        qk, qkv = self.rotated_qkv(x, (a,), cos, sin_signed, linear, scaled)  # (A, g, per + 1, hd), (A, g, per + 2, hd)
        keys, values = view.update(qk[:, :, per:], qkv[:, :, per + 1 :])  # (A, g, span, hd)
        q = qk[:, :, :per]
        if linear.native_on(self.qkv, a) and native.attends(q, keys, values, attn_mask):
            out = native.attend(q, keys, values, attn_mask)  # one call, not SDPA's ~25 us
        else:
            out = group_rows_attention(q, keys, values, attn_mask)  # (A, g, per, hd)
        y = self.finish(x, out.reshape(a, -1), linear).view(a, 1, -1)
        return y if probe is None else (y, None)

    def native_step(self, x, cos, sin_signed, view, probe=None):
        """The layer over rows x (N, h) in one native call (`native.layer_step`: `__call__`'s or
        `rows`' operations on the native kernel, the same numbers, without their ~45 tensor
        operations of a few us each), each row with its own slot, cache index and mask row (a
        decode step's, or a general pass's A x R rows), or None where the view or the tables do
        not have its form. `probe`: (y, its scores of y) (`native.layer_step`)."""
        kv = view.native_kv() if hasattr(view, "native_kv") else None  # a view of our caches
        if kv is None:
            return None
        weights, eps = self.native_parts()
        shape = (self.groups, self.per, self.head_dim, self.ffn)
        if probe is None:  # (the tests wrap `layer_step` with seven arguments)
            return native.layer_step(x, weights, shape, eps, cos, sin_signed, kv)
        return native.layer_step(x, weights, shape, eps, cos, sin_signed, kv, probe)

    def native_parts(self) -> tuple:
        """(weights as `native.layer_step` takes them, the two norms' eps)."""
        copy = kernels.native_copy
        weights = (self.w_in, copy(self.qkv), copy(self.proj), self.w_mid, copy(self.fc1), copy(self.fc2))
        return weights, (self.eps_in, self.eps_mid)

    def native_arithmetic(self, dtype: torch.dtype, a: int, r: int, linear: LeanKernels) -> bool:
        """Whether a general pass of r rows for each of a sequences rotates and attends natively
        (`native.rope_`, `native.attend`, within round-off of the modules' operations): where these
        sequences' decode steps do (their one-row QKV product native, no kernel forced to another)
        and r is a verify pass's few rows, or a prompt's many where the measured choice is native
        (`kernels.prompt_attention`; the CPU reference model's bf16 prefill of 166-token prompts
        28.5 -> 27.5 ms rotating natively too). Its norms and SwiGLU then run natively too
        (`LeanKernels.folded`'s `prepared`)."""
        if not linear.native_on(self.qkv, a):
            return False
        return r <= ATTEND_ROWS or kernels.prompt_attention(dtype, self.groups, self.per, self.head_dim, r)

    def rows(self, x, cos, sin_signed, attn_mask, view, linear: LeanKernels, newest=None) -> torch.Tensor:
        """The general pass (`Passes.advance`): x (A, R, h) -> (A, R, h), R rows per sequence
        (pending rows, drafts to verify, prompts), K/V written through `view` (a
        `KVCache.layer`'s view). cos, sin_signed: (A, R, 1, 1, hd) fp32 (`rows_tables`); attn_mask
        (A, 1, R, span). Attention is the call `SelfAttention.forward` makes: at R = 1 a group's
        query heads attend as its rows (`one_query_attention`, `group_rows_attention`), else every
        head with `enable_gqa` (SDPA can round the two layouts differently, so the layout follows
        the modules'). `newest` (each sequence's row index): where the rotation and attention are
        native (`native_arithmetic`), every row's K/V written, then only those rows attend and go
        through the rest of the layer -> (A, 1, h) (`newest_only`)."""
        a, r, g, per, hd = x.shape[0], x.shape[1], self.groups, self.per, self.head_dim
        x = x.view(a * r, -1)  # (A R, h)
        if newest is None and a * r <= FOLD_ROWS and linear.all_native(self.products, a * r):
            y = self.native_step(x, cos, sin_signed, view)  # each row a row of its own, its own mask row
            if y is not None:
                return y.view(a, r, -1)
        natively = self.native_arithmetic(x.dtype, a, r, linear)
        # (A, R, g, per + 1, hd), (A, R, g, per + 2, hd)
        qk, qkv = self.rotated_qkv(x, (a, r), cos, sin_signed, linear, natively=natively)
        keys, values = view.update(qk[:, :, :, per].transpose(1, 2), qkv[:, :, :, per + 1].transpose(1, 2))
        q = qk[:, :, :, :per]  # (A, R, g, per, hd)
        if newest is not None and natively:
            q, attn_mask, x, r = newest_only(q, attn_mask, x.view(a, r, -1), newest)
        if natively and native.attends(q, keys, values, attn_mask):
            # one call, SDPA's ~70-90 us at a verify pass's few rows; the arithmetic of these
            # sequences' decode steps, which attend natively where their products are native
            out = native.attend(q, keys, values, attn_mask)
        elif r == 1:  # (A, g, per, hd)
            out = group_rows_attention(q[:, 0], keys, values, attn_mask)
        else:
            # (A, heads, R, hd); one head per group: a view (SDPA reads the strides), else one copy
            q = (qk[:, :, :, 0] if per == 1 else qk[:, :, :, :per].reshape(a, r, g * per, hd)).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, enable_gqa=per > 1)
            out = out.transpose(1, 2)  # (A, R, heads, hd)
        return self.finish(x, out.reshape(a * r, g * per * hd), linear, natively).view(a, r, -1)


def newest_only(q: torch.Tensor, attn_mask: torch.Tensor, x: torch.Tensor, newest: list[int]) -> tuple:
    """(q, attn_mask, x, 1) of row newest[a] of each sequence a alone: q (A, R, g, per, hd) -> (A, 1,
    g, per, hd), attn_mask (A, 1, R, span) -> (A, 1, 1, span), x (A, R, h) -> (A, h). The last layer
    of a pass whose outputs are the newest rows' (a prompt's, a fill's): the other rows' K/V are
    written and nothing reads their outputs, so their attention, projection and MLP are skipped
    (the CPU reference model's bf16 prefill of ~160-token prompts, one layer's work of its 12
    less that layer's QKV product). Native attention gives a row the same numbers with or without
    the rows beside it; the products after it take the kernel chosen for A rows, as a decode step."""
    at, pick = torch.arange(q.shape[0]), torch.tensor(newest)
    return q[at, pick][:, None], attn_mask[at, :, pick][:, :, None], x[at, pick], 1


class NativeRun:
    """Consecutive lean layers of one shape and their caches as `native_run` takes them, worked
    out once (`of`; `Passes.native_run` keeps one per decode state and run of layers): their
    `native.LayerRun`, the products whose kernel each call asks for (every layer's are of one
    shape, so the first's), and the hook dicts each call looks at."""

    def __init__(self, layers: list[LeanLayer], caches: list[tuple], shape: tuple[int, int, int, int]) -> None:
        self.shape = shape  # (groups, query heads per group, head dim, ffn), every layer's
        self.products = layers[0].products
        self.hooks = tuple(d for f in layers for d in f.hooks)
        self.native = native.LayerRun([(*f.native_parts(), k, v) for f, (k, v) in zip(layers, caches)])

    @classmethod
    def of(cls, layers: list[LeanLayer], caches: list[tuple]) -> NativeRun | None:
        """`layers`' run with their K/V caches `caches` ((k, v) each), or None where their shapes differ."""
        first = layers[0]
        shape = (first.groups, first.per, first.head_dim, first.ffn)
        if any((f.groups, f.per, f.head_dim, f.ffn) != shape or f.w_in.shape != first.w_in.shape for f in layers):
            return None
        return cls(layers, caches, shape)


def runs_natively(run: NativeRun, rows: int, linear: LeanKernels) -> bool:
    """Whether `run`'s layers over `rows` rows run in one native call (`native_run`): every
    product on the native kernel at that many rows, not too many rows, no forward hook watching a
    layer."""
    return rows_natively(run.products, rows, linear) and not hooks_set(run.hooks)


def rows_natively(products: tuple, rows: int, linear: LeanKernels) -> bool:
    """`runs_natively` but the hooks, from a layer's products (every layer of a run has the first's shapes)."""
    return rows <= FOLD_ROWS and linear.all_native(products, rows)


def native_run(run: NativeRun, x, cos, sin_signed, rows_kv: tuple, linear: LeanKernels, probes=None, first: int = 0):
    """`run`'s layers over rows x (A, R, h) in one native call (`native.layers_step`), as their
    decode steps (`LeanLayer.__call__`, R = 1) or general passes (`rows`) one after another would
    run them where each runs in one call (`LeanLayer.native_step`): the same numbers. cos,
    sin_signed as those calls take them; rows_kv: the layout's (slots, positions, span, mask) (its
    `native_kv(cache, layer)[2:]`); `probes`, `first`: as `native.layers_step` takes them. (y (A, R, h), layers
    run, the scores of the probe on y or None), or None where they would not run in one call each
    (a kernel other than the native one, too many rows, a forward hook: nothing done)."""
    lead = x.shape[:-1]
    a = x.numel() // x.shape[-1]
    if not runs_natively(run, a, linear):
        return None
    made = native.layers_step(x.reshape(a, -1), run.native, run.shape, cos, sin_signed, rows_kv, probes, first)
    if made is None:
        return None
    return made[0].view(*lead, -1), made[1], made[2]


def hook_dicts(modules) -> tuple[dict, ...]:
    """The forward and forward-pre hook dicts of `modules`: any of them non-empty means a hook."""
    return tuple(d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks))


def hooks_set(dicts: tuple[dict, ...]) -> bool:
    """Whether a forward hook is set for every module, or in one of `dicts` (`hook_dicts`)."""
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(dicts)


def watched(modules) -> bool:
    """Whether a forward hook watches any of `modules` (or every module): code that replaces their
    calls must then run them, so that the hook sees the calls it expects."""
    return hooks_set(hook_dicts(modules))


def rows_tables(cos: torch.Tensor, sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`LeanLayer.rows`' angles from a layout's rotary cos and signed sine (A, 1, R, hd): both
    viewed (A, R, 1, 1, hd) (`Passes.layout` makes them once per layout)."""
    a, _, r, hd = cos.shape
    return cos.view(a, r, 1, 1, hd), sin_signed.view(a, r, 1, 1, hd)
