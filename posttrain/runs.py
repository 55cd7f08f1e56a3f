"""Reading a finished run folder: which stages finished, and where a stage's model, adapter and data are.

Shared by `posttrain eval`, `export` and `chat`, which all start from `outputs/<run> [--stage S]`.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from .configs import EvalArguments, StageArguments
from .console import console
from .errors import UserError
from .io import read_json
from .lineage import hub_snapshot

# The run order when run.json does not list one (a run.json from before `order` was recorded).
STAGE_ORDER = ("base", "sft", "dpo", "upo")
# Keys of a stage's resolved.yaml that are paths on the machine that ran it (set per run by the pipeline), not
# training choices: the report and the model card show them as lineage, never as hyperparameters.
MACHINE_PATH_KEYS = frozenset({"model_name_or_path", "tokenizer_name_or_path", "output_dir", "adapter_path",
                               "resume_from_checkpoint"})


@dataclass
class StageRef:
    run: Path
    stage: str
    base_model: str
    tokenizer: str
    adapter: str | None  # None for the base model
    resolved: dict  # the stage's resolved.yaml ({} for base)
    trust_remote_code: bool = False  # the recipe's base.trust_remote_code

    def check_base_model(self) -> None:
        """Before loading: the base model the run trained on is still where the run recorded it."""
        if Path(self.base_model).is_dir():
            return
        snapshot = hub_snapshot(Path(self.base_model))
        if snapshot:  # running the recipe again would take the revision's commit now, not this one
            again = f"hf download {snapshot[0]} --revision {snapshot[1]} puts that snapshot back"
        else:
            again = "`posttrain run` of the same recipe converts or caches it again"
        raise UserError(f"{self.run}: the base model this run trained on is not at {self.base_model} any more (a "
                        f"cleared cache, or the run moved from another machine); {again}, then this command works")


def run_state(run: Path, say=None) -> dict:
    """run.json, or {} when it cannot be read (written empty by a power loss): the stage folders still say what
    finished, and the order falls back to `STAGE_ORDER`. `say` is told why, when it cannot."""
    return read_json(Path(run) / "run.json", say)


def finished_stages(run: Path) -> list[str]:
    order = run_state(run).get("order") or STAGE_ORDER
    return [s for s in order if (run / s / "lineage.json").is_file()]


def stale_stages(root: str | Path) -> dict[str, str]:
    """{stage: why} for the stages trained from a previous stage that has since been trained again (their lineage's
    `previous_inputs_hash` is not the previous stage's now, or it has none and the previous stage's lineage, written
    after an upgrade, has one, or its `previous_weights` not the weights there now: `lineage.other_previous`), that its
    promote gate now rejects (a re-evaluation on another eval set, a stricter `gate:`: the run stopped there), trained
    from another stage than the one before it in the recipe's chain now (the chain was changed), or on another base
    model or chat template than the base evaluation now is of (`base_hash`: the run stopped in the first stage after
    the recipe's base was edited); and the stages after them. Left from an earlier run, they are not what the chain now
    gives, so neither the accuracy line nor the report compares them with it, and `posttrain eval`, `export` and
    `chat` do not pick them by default."""
    from .lineage import other_previous
    from .promotion import blocks_chain

    root = Path(root)
    stale, listed = {}, run_state(root).get("order")
    base_now = read_json(root / "base" / "lineage.json").get("base_hash")  # None: recorded before it was
    order = listed or STAGE_ORDER
    for index, step in enumerate(order):
        record = read_json(root / step / "lineage.json")
        previous = record.get("previous_stage")
        # the stage the recipe's chain now trains it from (a stage folder the recipe's earlier chain left, e.g. upo
        # trained from a dpo that `stages:` no longer has): only a run.json that lists its order says
        now = order[index - 1] if index and order[index - 1] != "base" else None
        if listed and step != "base" and record and previous != now:
            stale[step] = (f"trained from {previous or 'the base model'}, but the recipe now trains it from "
                           f"{now or 'the base model'}")
            continue
        trained_on = record.get("base_hash")
        if step != "base" and trained_on and base_now and trained_on != base_now:
            stale[step] = "trained on another base model or chat template than the run's base now"
            continue
        if not previous:
            continue
        recorded, upstream = record.get("previous_inputs_hash"), read_json(root / previous / "lineage.json")
        current = upstream.get("inputs_hash")
        # a stage recorded before `previous_inputs_hash` existed, its previous stage by a version that records it:
        # that one was trained again after an upgrade, and this one is from before
        older = "previous_inputs_hash" not in record and "previous_inputs_hash" in upstream
        if previous in stale or (recorded and current and recorded != current) or older or other_previous(root, record):
            stale[step] = f"trained from an earlier {previous}"
        elif blocks_chain(read_json(root / previous / "metrics.json").get("promotion")):
            stale[step] = f"trained from {previous}, which its promote gate rejected"
    return stale


def rejected_by_gate(run: Path, stage: str) -> str | None:
    """Why the promote gate of `run`'s `stage` rejected it (and stopped the run there), or None."""
    from .promotion import blocks_chain

    record = read_json(run / stage / "metrics.json").get("promotion")
    return ((record.get("gate") or {}).get("reason") or "failed") if blocks_chain(record) else None


def stage_ref(run: str | Path, stage: str | None = None, warn: bool = True) -> StageRef:
    """The stage `stage` of run folder `run` (default: its last finished stage that is not stale; the base model, with
    a warning unless not `warn`, when every trained stage is stale)."""
    run = Path(run)
    if not (run / "run.json").is_file():
        raise UserError(f"{run} is not a posttrain run folder (no run.json); expected outputs/<run name>")
    done = finished_stages(run)
    order = run_state(run).get("order") or []
    if stage and order and stage not in order:
        raise UserError(f"{run}: '{stage}' is not a stage of this run (stages: {', '.join(order)}; finished: "
                        f"{', '.join(done) or 'none'})")
    if not done:
        raise UserError(f"{run}: no finished stage yet")
    if not stage:
        stale = stale_stages(run)
        stage = next((s for s in reversed(done) if s not in stale), done[-1])
        if stage == "base" and stale and warn:
            console.print(f"[yellow]warning:[/yellow] every trained stage of {run} is stale ("
                          f"{'; '.join(f'{s}: {why}' for s, why in stale.items())}): using the base model; pass "
                          f"--stage {done[-1]} for the last of them")
        elif warn and (gate := rejected_by_gate(run, stage)):
            console.print(f"[yellow]warning:[/yellow] {stage} of {run} is the stage its promote gate rejected "
                          f"({gate}); pass --stage {done[done.index(stage) - 1]} for the one before it")
    if stage not in done:
        raise UserError(f"{run}: stage '{stage}' has not finished (finished: {', '.join(done)})")
    lineage = stage_record(run / stage / "lineage.json")
    recipe = yaml.safe_load((run / "recipe.yaml").read_text()) if (run / "recipe.yaml").is_file() else {}
    remote = bool(((recipe or {}).get("base") or {}).get("trust_remote_code"))
    if stage == "base":
        return StageRef(run, stage, lineage["base_model"], str(run / "base" / "tokenizer"), None, {}, remote)
    resolved = in_run(stage_record(run / stage / "resolved.yaml"), run.resolve())
    return StageRef(run, stage, resolved["model_name_or_path"], str(run / stage), str(run / stage), resolved, remote)


def check_not_run_file(out: str | Path, run: str | Path) -> None:
    """`posttrain eval RUN --out` names none of the run's own files: a stage's metrics.json replaced by a bare
    evaluation loses the stage's training record and its promote gate's verdict (a rejected stage then exports
    without --force), and the run replaces its step folders when it runs again."""
    root, where = Path(run).resolve(), Path(out).resolve()
    steps = [root / step for step in {*(run_state(root).get("order") or STAGE_ORDER), "data"}]
    if where in (root / "run.json", root / "recipe.yaml") or any(step in where.parents for step in steps):
        raise UserError(f"--out {out}: it is among the run's own files, which it would replace; write the "
                        f"evaluation beside them, e.g. --out {Path(run) / 'evals' / 'NAME.json'}")


def stage_record(path: Path) -> dict:
    """A stage folder's lineage.json, resolved.yaml or metrics.json, or a `UserError` naming it where it is missing or
    unreadable: the pipeline writes each whole, so the folder was damaged since (a copy or sync cut short)."""
    try:
        record = (json.loads if path.suffix == ".json" else yaml.safe_load)(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        record = exc
    if not isinstance(record, dict):
        why = ("missing" if isinstance(record, FileNotFoundError) else f"unreadable ({type(record).__name__}: "
               f"{record})" if isinstance(record, Exception) else "unreadable (empty or not a mapping)")
        raise UserError(f"{path}: {why}; the stage folder is damaged (a copy or sync cut short?): copy it again, or "
                        "run the stage again")
    return record


def in_run(resolved: dict, run: str | Path, record: dict | None = None) -> dict:
    """A stage's resolved arguments (or `record`, another of its files: its lineage) with the run folder they were
    written in (their `output_dir`'s parent) written as `run`: a run folder copied or moved elsewhere is evaluated on
    its own `{data}`, not on that of a folder since gone or built again, and moving it changes none of its stages'
    inputs."""
    record = resolved if record is None else record
    written = Path(resolved["output_dir"]).parent if resolved.get("output_dir") else None  # <run>/.<stage>.partial
    if written is None or written == Path(run):
        return record
    return json.loads(renamed(json.dumps(record, ensure_ascii=False, default=str), written, str(run)))


def renamed(text: str, root: str | Path, new: str) -> str:
    """`text` with the folder `root` written `new` where it names that folder or a path in it, not where it is part
    of a longer name (`outputs/exp` in `outputs/exp-data/x` or in `/backup/outputs/exp/x`: another folder)."""
    # not after a name or a slash (a longer path ending so), not before what a file name goes on with
    return re.sub(rf"(?<![\w.@+~/-]){re.escape(str(root))}(?![\w.@+~-])", lambda _: new, text)


def eval_target(run: str | Path, stage: str | None, given: dict) -> tuple[StageRef, EvalArguments]:
    """A run's stage and the settings the run evaluated it with (its recipe's `eval:`: prompts, token budget, batch,
    precision), under the ones `given` on the command line: re-evaluating a stage gives the accuracy the run printed
    (a batch of another size can change a few greedy answers in bf16). With another dataset `given`, the run's split
    and row limit are left behind with its own dataset."""
    ref = stage_ref(run, stage)
    stage_args = ref.resolved or _any_resolved(ref.run)
    recorded = StageArguments.to_eval(stage_args)
    if given.get("dataset"):
        recorded = {k: v for k, v in recorded.items() if k not in ("dataset", "split", "limit")}
    elif not recorded.get("dataset"):
        raise UserError(f"{ref.run}: the recipe has no eval dataset; pass --dataset")
    return ref, EvalArguments(**{**recorded, **given})


def _any_resolved(run: Path) -> dict:
    for path in sorted(run.glob("*/resolved.yaml")):
        return yaml.safe_load(path.read_text())
    return {}
