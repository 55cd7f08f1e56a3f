"""LoRA on the dense layers of MoE models whose layers share names with their experts (PEFT 0.21, transformers 5).

transformers 5 stores an MoE block's experts as 3-D parameters (`experts.gate_up_proj`, `experts.down_proj`), and PEFT
renames what a LoRA config targets to match (`_convert_peft_config_moe`): `gate_proj`, `up_proj` and `down_proj` become
those parameters. It renames every target with such a name, so on ERNIE-4.5-MoE, DeepSeek-V3, GLM-4-MoE and the
others with a dense first layer or shared experts, the dense MLPs, whose `nn.Linear` layers have the same names, lose
their LoRA: `all-linear` skipped them, and naming `shared_experts.gate_proj` trained the routed experts instead
(huggingface/peft#3711; the fix, huggingface/peft#3715, is not in a release). `keep_dense_targets` wraps the
conversion as that fix does: a target that names a real `nn.Linear` layer stays a module target as well.

Installed wherever posttrain builds or loads an adapter (`install`), so training and every later load of the adapter
resolve the same layers. Plain PEFT 0.21 loading such an adapter leaves out the dense layers' LoRA, without a warning;
a merged export has them.

PEFT converts only the MoE models it has a mapping for (Mixtral, Qwen-MoE, ERNIE-4.5-MoE, ...). On another one, such as
ERNIE-4.5-VL (`ernie4_5_vl_moe`), `all-linear` took the `nn.Linear` layers only: not the experts (3-D parameters) nor
the routers, so the routed experts never trained. `expert_targets` adds them as parameter targets, as that conversion
does; they are written into the adapter's config, so plain PEFT loads them.
"""

import functools


def install() -> None:
    """Wrap PEFT's MoE config conversion once per process (a no-op where PEFT has no such conversion)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return
    original = getattr(conversion, "_convert_peft_config_moe", None)
    if original is None or getattr(original, "_keeps_dense_targets", False):
        return
    conversion._convert_peft_config_moe = keep_dense_targets(original)


def keep_dense_targets(original):
    @functools.wraps(original)
    def convert(peft_config, model) -> None:
        requested = peft_config.target_modules
        original(peft_config, model)
        outside_excluded(peft_config, model)
        converted = peft_config.target_modules
        if requested is None or requested == converted or not isinstance(converted, set):
            return
        kept = {target for target in _linear_targets(requested, model, peft_config.target_parameters or ())
                if target not in converted}
        peft_config.target_modules = converted | kept

    convert._keeps_dense_targets = True
    return convert


def outside_excluded(peft_config, model) -> None:
    """PEFT 0.21 applies `exclude_modules` to module targets only: an MoE's experts and routers, parameter targets, took
    LoRA in every layer, also below `lora_top_layers` (so the backward pass ran to the bottom again). Each parameter
    target becomes the full names of the parameters it matches outside the excluded modules."""
    import re

    excluded, targets = peft_config.exclude_modules, peft_config.target_parameters
    if not excluded or not targets:
        return

    def is_excluded(name: str) -> bool:  # as PEFT matches `exclude_modules` against a module's name
        if isinstance(excluded, str):
            return re.fullmatch(excluded, name) is not None
        return any(name == e or name.endswith(f".{e}") for e in excluded)

    kept = set()
    for name, module in model.named_modules():
        name = name.replace(".base_layer", "")  # a layer already wrapped by an adapter, as PEFT names it
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}"
            if any(key == t or key.endswith(f".{t}") for t in targets) and not is_excluded(name):
                kept.add(key)
    peft_config.target_parameters = sorted(kept)


def _linear_targets(requested, model, target_parameters) -> set[str]:
    """The targets of `requested` (a list of names matched as PEFT matches them, or a string: `all-linear`, else a
    regex) that name at least one `nn.Linear` layer of `model`, the output layer and layers whose weight is a
    parameter target left out. `all-linear` gives the layers' leaf names, a regex the full names of those it matches."""
    import re

    import torch

    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # a layer an adapter already wraps (when a second adapter is added, e.g. TRL's frozen "ref" copy of a continued
    # one) is its `base_layer`; LoRA's own matrices are not targets
    names = [name.removesuffix(".base_layer") for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) and module is not output
             and not any(part.startswith("lora_") for part in name.split("."))
             and not any(f"{name}.weight" == p or f"{name}.weight".endswith(f".{p}") for p in target_parameters)]
    if not isinstance(requested, str) and {*requested} == {"all-linear"}:
        requested = "all-linear"
    if isinstance(requested, str) and requested.lower() == "all-linear":
        return {name.rsplit(".", 1)[-1] for name in names}
    if isinstance(requested, str):  # a regex: the layers it matches, by full name (a leaf name would also take the
        # same-named layers it leaves out, e.g. the dense first layer's MLP for a regex naming the shared experts)
        return {name for name in names if re.fullmatch(requested, name)}
    return {target for target in requested
            if any(name == target or name.endswith(f".{target}") for name in names)}


def expert_targets(peft_config, model):
    """`all-linear` on an MoE model PEFT has no conversion for: its experts' 3-D parameters (`experts.gate_up_proj`,
    `experts.down_proj`) and its routers' weights (the `gate` beside them, no `nn.Linear`) become parameter targets, as
    PEFT's conversion makes them on the MoE models it knows (which are left to it). Other targets are left as asked."""
    import torch

    requested = peft_config.target_modules
    all_linear = requested == "all-linear" or (not isinstance(requested, str) and list(requested or []) == ["all-linear"])
    if not all_linear or peft_config.target_parameters or peft_converts(model.config.model_type):
        return peft_config
    modules, targets = dict(model.named_modules()), set()
    for name, module in modules.items():
        parent, _, leaf = name.rpartition(".")
        experts = [p for p, param in module.named_parameters(recurse=False) if param.dim() == 3]
        if leaf != "experts" or not experts:
            continue
        targets |= {f"experts.{p}" for p in experts}
        router = modules.get(f"{parent}.gate")
        if router is not None and not isinstance(router, torch.nn.Linear) and "weight" in dict(router.named_parameters()):
            targets.add("gate.weight")
    if targets:
        peft_config.target_parameters = sorted(targets)
    return peft_config


def peft_converts(model_type: str | None) -> bool:
    """Whether PEFT's own MoE conversion renames the targets of a model of `model_type` to its experts' parameters
    (when the adapter is built and again when it is loaded)."""
    try:
        from peft.utils import transformers_weight_conversion as conversion
    except ImportError:
        return False
    # the two tables PEFT's conversion looks the model up in; it converts nothing where either lacks it
    pattern = getattr(conversion, "_MODEL_TO_CONVERSION_PATTERN", {}).get(model_type)
    return bool(getattr(conversion, "_MOE_TARGET_MODULE_MAPPING", {}).get(pattern)
                and getattr(conversion, "_MOE_FUSED_TARGETS", {}).get(pattern))
