"""A plain LoRA layer's update added inside its second matmul on CPU in float32 (`update_in_matmul`).

PEFT computes a LoRA linear layer as `base(x) + lora_B(lora_A(x)) * scaling`: besides the three matmuls, a
[tokens, out_features] product by the scaling and a sum of two such tensors in the forward, and the product again in
the backward. On a CPU these passes over memory cost about as much as the small LoRA matmuls themselves (SmolLM2-135M's
MLP projections, 1,536 features, in a profile of its SFT steps). `base(x).addmm_(lora_A(x), lora_B.T,
alpha=scaling)` does the same in one BLAS call into the base output, whose backward scales the [tokens, r] and
[r, out_features] gradients instead. A forward and backward of the default recipe's float32 SFT batches took 1.12x
less time [1.03-1.44 over 10 batches, alternated in one process, 2 cores without bf16 instructions]. The sums are
rounded once instead of twice, so the result differs in float32 rounding only: after 12 SFT steps the adapter's
weights differed by at most 1.3e-6 (against values up to 0.05) and the logged losses not in four digits. (In place
because the out-of-place `torch.addmm` first copies the base output, which nothing saved for the backward: without
that copy a forward and backward of SmolLM2-135M's body over 1,100-1,200 tokens took 1.016x [1.010-1.023] less time,
gradients bit for bit the same.)

PEFT has no such path, so each plain layer's forward is replaced for the duration: float32 on CPU without autocast,
one active vanilla LoRA adapter without dropout over an `nn.Linear`, no bias on `lora_B`. Any other call (bf16
autocast, where this is unmeasured and would round differently; merged or disabled adapters; a bf16 base; a GPU,
unmeasured) goes to PEFT's own forward.
"""

import contextlib
import functools

from .precision import no_dropout


def _plain(layer) -> bool:
    """A LoRA linear layer over an `nn.Linear` whose own modules run nothing of their own around their forward (the
    fused path reads their weights and skips their calls): no hooks, e.g. accelerate's offloading ones."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    if not isinstance(layer, LoraLinear) or type(layer.base_layer) is not torch.nn.Linear or "forward" in vars(layer):
        return False
    inner = [layer.base_layer, *layer.lora_A.values(), *layer.lora_B.values()]
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in inner)


def _fused(layer, x, args, kwargs) -> bool:
    """Whether this call can take the fused path (see the module docstring)."""
    import torch

    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in layer.lora_variant:
        return False
    if not no_dropout(layer.lora_dropout[name]) or layer.lora_B[name].bias is not None:
        return False
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    weights = (layer.base_layer.weight, layer.lora_A[name].weight, layer.lora_B[name].weight)
    return x.dtype == torch.float32 and all(w.dtype == torch.float32 and w.device == x.device for w in weights)


def forward(layer, x, *args, **kwargs):
    """PEFT's `lora.Linear.forward`, with the update added by `addmm` where `_fused` allows."""
    import torch

    if not _fused(layer, x, args, kwargs):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = layer.active_adapters[0]
    base, lora_a, lora_b = layer.base_layer, layer.lora_A[name], layer.lora_B[name]
    flat = x.reshape(-1, x.shape[-1])
    # into the base output itself: nothing saved it for a backward, and `torch.addmm` would first copy it whole
    out = torch.nn.functional.linear(flat, base.weight, base.bias)
    out.addmm_(torch.nn.functional.linear(flat, lora_a.weight), lora_b.weight.t(), alpha=layer.scaling[name])
    return out.view(*x.shape[:-1], out.shape[-1])


@contextlib.contextmanager
def update_in_matmul(model):
    """For the duration, the model's plain LoRA linear layers compute their update inside the second matmul where
    `_fused` allows (an instance attribute over the class's `forward`; hooks still run)."""
    try:
        import peft.tuners.lora  # noqa: F401
    except ImportError:
        yield
        return
    layers = [module for module in model.modules() if _plain(module)]
    for layer in layers:
        layer.forward = functools.partial(forward, layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
