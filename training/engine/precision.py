"""Mixed precision: the autocast a run asks for, and the per-layer check that refuses kernels giving wrong answers."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from torch import nn

from training.config import TrainConfig


def autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision: bf16 on CUDA or the CPU (oneDNN runs it on AMX / AVX-512 bf16, where a CPU has them), fp16
    (with a GradScaler) on CUDA only. BatchNorm, the losses and the optimiser stay fp32."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"--amp fp16 needs CUDA, not {device.type}; use --amp bf16 on the CPU")
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def check_mixed_precision(networks: dict[str, nn.Module], config: TrainConfig, device: torch.device) -> None:
    """Refuses, before any training, a precision whose kernels give wrong answers here: one eval-mode forward of
    each network at the input size, every convolution and linear layer also run under ``config.amp``'s autocast
    on the same input and compared with fp32. bf16 keeps a layer within 0.3-0.6% (relative L2 error, measured);
    across a whole MobileNetV2 that adds up to about 6%, so the check is per layer. oneDNN's CPU bf16 3x3 stride-2
    convolution fails it (torch 2.14.1) where its output is one pixel wide, as in a ResNet's layer4 at inputs 32
    pixels wide: relative errors of 0.6 or NaN."""
    if config.amp == "none":
        return
    autocast(config.amp, device)  # refuses fp16 off CUDA
    m = config.model_config()
    x = torch.randn(2, 3, m.input_height, m.input_width, generator=torch.Generator().manual_seed(0)).to(device)
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    errors: dict[str, float] = {}

    def compare(name: str, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        with autocast(config.amp, device):
            low = module.forward(*inputs)  # .forward: no hooks, so no recursion
        errors[name] = ((low.float() - output.float()).norm() / output.float().norm().clamp_min(1e-12)).item()

    for net_name, net in networks.items():
        layers = [(n, mod) for n, mod in net.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
        hooks = [mod.register_forward_hook(functools.partial(compare, f"{net_name} {n}")) for n, mod in layers]
        was_training = net.training
        net.eval()  # no running statistics touched
        try:
            with torch.no_grad():
                net(x)
        finally:
            net.train(was_training)
            for hook in hooks:
                hook.remove()
    name, error = max(errors.items(), key=lambda kv: kv[1] if math.isfinite(kv[1]) else math.inf, default=("", 0.0))
    if not error < 0.1:
        raise ValueError(
            f"--amp {config.amp} gives wrong outputs in the {name} layer on {device.type} at "
            f"{m.input_height}x{m.input_width} (relative error {error:.3g} against fp32); use --amp none or a larger "
            "input (oneDNN's bf16 stride-2 convolution fails on maps 2 pixels wide)"
        )
