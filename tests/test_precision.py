"""bf16 only where it has kernels (`megatron/early_exit/precision.py`): the check itself, the flag the
demo takes from it, and training's warning when `--bf16` asks for the slow fallback."""

import pytest
import torch

from megatron.early_exit import precision
from megatron.early_exit.arguments import parse_args
from megatron.early_exit.training import trainer as trainer_mod
from tests.test_reliability import TINY


def test_the_check_follows_onednn_and_the_flag_follows_the_check(monkeypatch, capsys):
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert precision.fast_bf16() is native and precision.fast_bf16("cpu") is native
    assert precision.bf16_flag() == ("--bf16" if native else "")
    monkeypatch.setattr(precision, "fast_bf16", lambda device="cpu": False)
    precision.main([])
    precision.main(["--dtype"])
    assert capsys.readouterr().out == "\nfp32\n"
    monkeypatch.setattr(precision, "fast_bf16", lambda device="cpu": True)
    precision.main([])
    precision.main(["--dtype"])
    assert capsys.readouterr().out == "--bf16\nbf16\n"
    with pytest.raises(SystemExit, match="usage: python -m megatron.early_exit.precision"):
        precision.main(["--fp16"])


def test_decoding_takes_bf16_where_kernels_or_the_native_kernel_multiply_it(monkeypatch, capsys):
    from megatron.early_exit.inference import native

    monkeypatch.setattr(precision, "fast_bf16", lambda device="cpu": True)
    assert precision.decode_dtype() == "bf16"  # bf16 kernels: whatever the native kernel
    monkeypatch.setattr(precision, "fast_bf16", lambda device="cpu": False)
    monkeypatch.setattr(native, "available", lambda dtype=torch.float32: dtype == torch.bfloat16)
    assert precision.decode_dtype() == "bf16" and precision.decode_dtype("cpu") == "bf16"
    precision.main(["--decode-dtype"])
    assert capsys.readouterr().out == "bf16\n"
    monkeypatch.setattr(native, "available", lambda dtype=torch.float32: False)  # no compiler, or EE_NATIVE=0
    assert precision.decode_dtype() == "fp32"
    precision.main(["--decode-dtype"])
    assert capsys.readouterr().out == "fp32\n"


@pytest.mark.parametrize("fast", [True, False])
def test_training_warns_when_bf16_has_no_kernels(monkeypatch, capsys, fast):
    monkeypatch.setattr(trainer_mod, "fast_bf16", lambda device: fast)
    trainer_mod.Trainer(parse_args([*TINY, "--bf16", "--dry-run"]))
    err = capsys.readouterr().err
    assert ("warning: --bf16: this CPU has no bf16 matrix kernels" in err) is not fast
    monkeypatch.setattr(trainer_mod, "fast_bf16", lambda device: False)
    trainer_mod.Trainer(parse_args([*TINY, "--dry-run"]))  # fp32: nothing to warn about
    assert "warning: --bf16" not in capsys.readouterr().err
