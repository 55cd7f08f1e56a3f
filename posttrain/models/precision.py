"""Frozen weights cast once for bf16 autocast (and LoRA merged into the copies, for sampling; `sampling_weights`: the
same merge in float32 on CPU), and LoRA inputs left in autocast's dtype while training under it (`lora_inputs_uncast`).

Autocast casts every linear weight to bf16 again on every forward. In decoding, one forward per token, those copies
were ~15% of generation time here (batch 100, SmolLM2-135M, 2 CPU cores). `frozen_weights_cast` makes them once for
the duration of a block and puts the model's own weights back after it.
"""

import contextlib


@contextlib.contextmanager
def frozen_weights_cast(model, dtype, merge_lora: bool = False):
    """The frozen float32 weights of the model's linear layers (LoRA's base layers, the LM head) as `dtype` copies for
    the duration; the LoRA matrices, embeddings and norms are left as they are. Under autocast to `dtype` these are
    the values autocast computes itself, so outputs are bit-identical (tested). A tied LM head gets its own copy while
    the embedding keeps the float32 original. Sharded (FSDP, DeepSpeed) and non-float32 weights are skipped.

    `merge_lora`: each LoRA layer's update is added into its copy and the adapter layers are off for the duration,
    so a decoding step skips two small matmuls per layer (~25% less time for rollouts of 8 x 40 tokens here). The
    result is the adapted model up to bf16 rounding, not bit-identical: for sampling, not for scoring."""
    import torch

    def copied(name, module) -> bool:
        weight = getattr(module, "weight", None)
        return (isinstance(module, torch.nn.Linear) and "lora_" not in name and weight is not None
                and not weight.requires_grad and weight.dtype == torch.float32 and type(weight.data) is torch.Tensor
                and weight.numel() > 0)

    targets = [module for name, module in model.named_modules() if copied(name, module)]
    lora_owner = _mergeable_lora_layers(model) if merge_lora else {}
    if not lora_owner.keys() <= {id(module) for module in targets}:
        lora_owner = {}  # a LoRA layer whose base weight is not copied (sharded, bf16): nothing is merged
    swapped = []
    with torch.no_grad():
        for module in targets:
            weight = module.weight
            copy = weight.detach()
            owner = lora_owner.get(id(module))
            if owner is not None:
                copy = copy + sum(owner.get_delta_weight(a) for a in owner.active_adapters if a in owner.lora_A)
            swapped.append((module, weight))
            module.weight = torch.nn.Parameter(copy.to(dtype), requires_grad=False)
    try:
        with model.disable_adapter() if lora_owner else contextlib.nullcontext():
            yield
    finally:
        for module, weight in swapped:
            module.weight = weight


@contextlib.contextmanager
def lora_inputs_uncast(model):
    """PEFT casts each LoRA layer's input to the adapter's float32 before the LoRA matmuls; under autocast the matmul
    casts it straight back to bf16, so the round trip changes no value and costs two [tokens, features] copies per
    layer, and two more in the backward: ~4% of an SFT step of the default recipe (1.01-1.10x over 10 alternated
    steps, 2 CPU cores). For the duration, each plain LoRA layer without dropout skips PEFT's cast on the calls where
    autocast is on for its input's device (a forward pre-hook decides per call), so outside autocast, e.g. a bf16
    base model with float32 adapters, the cast still happens. PEFT's switch for it is the `cast_input_dtype_enabled`
    attribute (`peft.helpers.disable_input_dtype_casting` turns it off for every call)."""
    import torch

    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        yield
        return

    def plain(module) -> bool:
        return (isinstance(module, LoraLinear) and not getattr(module, "lora_variant", None)
                and all(no_dropout(d) for d in module.lora_dropout.values()))

    def decide(module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        module.cast_input_dtype_enabled = not (torch.is_tensor(x) and torch.is_autocast_enabled(x.device.type))

    layers = [module for module in model.modules() if plain(module)]
    before = [(module, getattr(module, "cast_input_dtype_enabled", True)) for module in layers]
    hooks = [module.register_forward_pre_hook(decide, with_kwargs=True) for module in layers]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module, value in before:
            module.cast_input_dtype_enabled = value


def no_dropout(module) -> bool:
    """A LoRA layer's dropout that drops nothing: PEFT's Identity for `lora_dropout: 0`, or a Dropout whose p TRL's
    `disable_dropout` set to 0 (a previous stage's adapter trained with dropout)."""
    import torch

    return isinstance(module, torch.nn.Identity) or (isinstance(module, torch.nn.Dropout) and module.p == 0)


def bf16_autocast(model, merge_lora: bool = False):
    """bf16 autocast on the model's device with its frozen weights cast once (`frozen_weights_cast`), as one context:
    what evaluation, pair sampling and UPO's rollouts decode under."""
    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(model.device.type, dtype=torch.bfloat16))
    stack.enter_context(frozen_weights_cast(model, torch.bfloat16, merge_lora))
    return stack


def sampling_weights(model, bf16: bool, merge_lora: bool = False):
    """What evaluation, pair sampling and UPO's rollouts decode under: `bf16_autocast` with `bf16`; in float32, with
    `merge_lora` on a CPU, the LoRA update added into float32 copies of its base layers' weights (layers without LoRA
    are not copied; on a GPU the copies are not worth its memory); otherwise the model as it is."""
    import torch

    if bf16:
        return bf16_autocast(model, merge_lora)
    if merge_lora and model.device.type == "cpu":
        return frozen_weights_cast(model, torch.float32, merge_lora=True)
    return contextlib.nullcontext()


def _mergeable_lora_layers(model) -> dict:
    """{id(base layer): LoRA layer} for the active plain-LoRA linear layers of a PEFT model; empty when turning the
    adapter layers off would drop more than what is merged (LoRA on embeddings, DoRA, `modules_to_save` or other
    wrapped modules, a layer merged already: turned off, it unmerges its update out of the copy) or the model has no
    `disable_adapter`."""
    if not hasattr(model, "disable_adapter"):
        return {}
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return {}
    # PEFT's tuner layers and auxiliary wrappers (modules_to_save, trainable tokens) all carry `_disable_adapters`
    wrapped = [m for m in model.modules() if hasattr(m, "_disable_adapters")]
    if any(not isinstance(m, LoraLinear) or m.merged for m in wrapped):
        return {}
    layers = [m for m in wrapped if not m.disable_adapters]
    # DoRA and other variants, or a bias on lora_B: more than `get_delta_weight` adds into the weight
    if any(m.use_dora.get(a) or m.lora_bias.get(a) or a in getattr(m, "lora_variant", {})
           for m in layers for a in m.active_adapters):
        return {}
    return {id(m.base_layer): m for m in layers}
