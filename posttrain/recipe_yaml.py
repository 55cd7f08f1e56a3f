"""Reading a recipe file: YAML with duplicate keys refused and its size bounded, and `KEY=VALUE` overrides parsed as
YAML scalars of the type the key takes, into the nested mapping."""

import io
import re
import typing
from pathlib import Path

import yaml
from rich.markup import escape

from .configs import BaseModelArguments, EvalArguments, GateArguments
from .console import console
from .errors import UserError
from .recipe_fields import STAGES, TOP_TYPES, stage_fields
from .typecheck import field_types, is_text


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML keeps the last one silently, and in a
    recipe that is two edits of one setting, of which the one further up looks like it applies."""

    def construct_mapping(self, node, deep=False):
        first, pairs = {}, node.value if isinstance(node, yaml.MappingNode) else []  # else the base class refuses
        for key_node in [key for key, _ in pairs if key.tag != "tag:yaml.org,2002:merge"]:  # `<<:` may be overridden
            key = self.construct_object(key_node, deep=True)
            earlier = first.setdefault(key, key_node) if isinstance(key, typing.Hashable) else key_node
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping (first on line {earlier.start_mark.line + 1})"
                    "; the second would silently win: keep one", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: Path) -> dict:
    """The YAML of a recipe file; a UserError naming the file (and the line) when it is not UTF-8 or not YAML."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at byte offset {exc.start}); "
                        "save the recipe as UTF-8") from None
    stream = io.StringIO(text)
    stream.name = str(path)  # YAML's errors then say `in "<path>", line 3`, not `in "<unicode string>"`
    try:
        raw = yaml.load(stream, Loader=RecipeLoader) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from exc
    _check_expanded_size(raw, path)
    return raw


MAX_RECIPE_VALUES = 100_000  # a real recipe has a few hundred


def _check_expanded_size(raw, path: Path) -> None:
    """Refuse a recipe whose YAML aliases repeat so much that it grows huge once written out: each `*alias` is one
    shared object when loaded, but the fingerprint, resolved.yaml and the report write every repeat (a 1 kB file of
    nested aliases is 10^9 values: minutes, then out of memory). Counted each time it is reached, and stopped early."""
    pending, seen = [raw], 0
    while pending:
        value = pending.pop()
        seen += 1
        if seen > MAX_RECIPE_VALUES:
            raise UserError(f"{path}: more than {MAX_RECIPE_VALUES:,} values once its YAML aliases (*name) are "
                            "expanded; a recipe this large is an alias bomb, not a recipe")
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)


class ValueLoader(RecipeLoader):
    """A command-line value with YAML 1.2's plain scalars (int `10`, float `1e-4`, true/false, null, else a string):
    YAML 1.1 reads `010` as 8, `1:30` as 90, `yes` as true and `2024-01-01` as a date, which no one means there."""

    yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in resolvers if tag.rsplit(":", 1)[1] not in
                                       ("bool", "int", "float", "timestamp")]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


for _kind, _pattern, _first, _make in (
        ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF", lambda text: text.lower() == "true"),
        ("int", r"[-+]?[0-9]+", "-+0123456789", int),
        ("float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?", "-+.0123456789", float)):
    ValueLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_kind}", re.compile(f"^(?:{_pattern})$"), list(_first))
    ValueLoader.add_constructor(f"tag:yaml.org,2002:{_kind}",
                                lambda loader, node, make=_make: make(loader.construct_scalar(node)))


def parse_override(text: str, annotation):
    """An override's value for a field of `annotation` (None: unknown). The text as given for a text field (`1.10`,
    `exp #3`); else `ValueLoader`'s YAML, refusing a `#` comment, which YAML would drop with the text after it."""
    quoted = len(text) >= 2 and text[0] in "'\"" and text[-1] == text[0]
    if annotation is not None and is_text(annotation) and not quoted:
        return None if text in ("null", "~") and type(None) in typing.get_args(annotation) else text
    *_, last, _end = yaml.scan(text, Loader=ValueLoader)
    comment = text[last.end_mark.index:].strip()  # the scanner skips a comment: what is left after the last token
    if comment:
        raise ValueError(f"'{comment}' would be read as a YAML comment and dropped; quote the value if it is text "
                         f"(e.g. '\"{text}\"')")
    return yaml.load(text, Loader=ValueLoader)


def apply_overrides(raw: dict, overrides: list[str], where: str) -> dict:
    """`stages.sft.learning_rate=1e-4` style overrides (values: `parse_override`). A section the file leaves empty
    (`shared:` with nothing under it) takes overrides like one it fills."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' should look like section.key=value (e.g. stages.sft.max_steps=10)")
        dotted, value = item.split("=", 1)
        keys = dotted.split(".")
        try:  # one override of a variant: typed as its own key
            value = parse_override(value, override_type(keys[3:] if variant_override(keys) else keys, raw))
            set_dotted(raw, dotted, value, f"{where}: override '{item}'")
        except ValueError as exc:
            raise UserError(f"{where}: override '{item}': {exc}") from None
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"{where}: override '{item}': the value {value!r} is not valid YAML ({problem}); quote "
                            "strings and close brackets, e.g. shared.lora_target_modules=[q_proj,v_proj]") from exc
        if keys[0] == "shared" and len(keys) == 2:
            warn_shadowed(raw, keys[1], item, where)
    return raw


def variant_override(keys: list[str]) -> bool:
    """`ablation.variants.NAME.<key>` split on its dots: one override of an ablation variant, whose own key is the
    dotted rest (`set_dotted`)."""
    return keys[:2] == ["ablation", "variants"] and len(keys) > 3


def set_dotted(raw: dict, dotted: str, value, what: str) -> None:
    """Set `stages.sft.learning_rate` in the nested mapping `raw`, making the mappings on the way, also for a section
    the file leaves empty (`shared:` with nothing under it); `what` names the override in the error for a key on the
    way that holds a value, not a mapping. Command-line overrides and an ablation's variants both set keys this way.

    A variant's overrides are keyed by their dotted path (`grpo: {stages.upo.upo_lambda: 0.0}`), so
    `ablation.variants.grpo.stages.upo.upo_lambda` sets the key `stages.upo.upo_lambda` of `grpo`, beside its other
    overrides: split on every dot it added a `stages:` override that replaced all of the variant's stages."""
    keys = dotted.split(".")
    if variant_override(keys):
        keys = [*keys[:3], ".".join(keys[3:])]
    *parents, key = keys
    node = raw
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"{what}: '{part}' is not a mapping")
    node[key] = value


def override_type(keys: list[str], raw: dict):
    """The annotation of the field an override sets: a top-level value, a key of `base:`, `eval:`, a gate or a stage
    (`shared.K`: text only if text in every stage that takes K); None for others (data jobs, ablation)."""
    if len(keys) == 1:
        return TOP_TYPES.get(keys[0])
    section, key = keys[0], keys[-1]
    if keys[-2] == "gate" and (section, len(keys)) in (("shared", 3), ("stages", 4)):
        return field_types((GateArguments,)).get(key)
    if section in ("base", "eval") and len(keys) == 2:
        return field_types((BaseModelArguments if section == "base" else EvalArguments,)).get(key)
    if section == "stages" and len(keys) == 3 and keys[1] in STAGES:
        return stage_fields(keys[1])[0].get(key)
    if section == "shared" and len(keys) == 2:
        stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
        kinds = [fields[key] for stage in STAGES if stage in stages or not stages
                 for fields in [stage_fields(stage)[0]] if key in fields]
        return kinds[0] if kinds and all(is_text(kind) for kind in kinds) else None
    return None


def warn_shadowed(raw: dict, key: str, item: str, where: str) -> None:
    """Say so when stages set `key` themselves: a `shared.K` override does not reach them."""
    stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
    if own := [stage for stage, args in stages.items() if isinstance(args, dict) and key in args]:
        effect = "so it changes nothing" if len(own) == len(stages) else "so it does not reach them"
        console.print(f"[yellow]warning:[/yellow] {escape(where)}: override '{escape(item)}': stage(s) "
                      f"{', '.join(own)} set {key} themselves, {effect}; override stages.<stage>.{key} instead")
