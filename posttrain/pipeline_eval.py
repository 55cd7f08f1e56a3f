"""The held-out side of a run (`Pipeline`): the base model's evaluation, a finished stage evaluated again when the
evaluation changed, and the promote gate between a stage and the step before it."""

import dataclasses
import json
import sys
import time
from pathlib import Path

import yaml

from . import lineage
from .childproc import LAUNCHER
from .configs import StageArguments
from .console import console
from .io import read_json, write_json, write_text
from .promotion import GateStopped, blocks_chain, promotion


class HeldOutSteps:
    """Held-out evaluation steps of a `Pipeline`, which provides `root`, `recipe`, `base_model`, `template`,
    `num_processes`, `nodes`, `coordinator`, `digest`, `substitute`, `shared_paths`, `_record`, `_spawn`,
    `_up_to_date` and `print_summary`. `evaluate_base` sets `base_hash`, `legacy_base_hashes` and `eval_hash`, which
    the stages' hashes build on."""

    def evaluate_base(self) -> None:
        """Held-out metrics of the base model (skipped when its inputs did not change)."""
        out = self.root / "base"
        # what the stages train from; the held-out evaluation is not part of it (`reevaluate`)
        shape = {"model": lineage.model_fingerprint(self.base_model), "template": self.template}
        identity = self.base_identity
        if identity is None:  # not resolved by `resolve_base`
            identity = lineage.base_identity(self.recipe.base.model_name_or_path, self.base_model)
        self.base_hash = self.digest({**shape, **identity})
        # what runs recorded before `base_identity` existed, and before it held a local base's tokenizer files, hashed:
        # their finished steps stay finished after an upgrade
        weights_only = {k: v for k, v in identity.items() if k != "tokenizer"}
        self.legacy_base_hashes = (self.digest(shape), self.digest({**shape, **weights_only}))
        self.eval_hash = self.held_out_hash()
        digest = self.digest({"base": self.base_hash, "eval": self.eval_hash})
        if self._up_to_date(out, digest, *(self.digest({"base": legacy, "eval": self.eval_hash})
                                           for legacy in self.legacy_base_hashes)):
            # what an earlier failed attempt (another eval set) recorded no longer describes the base evaluation
            self._record("base", status="done", error=None, log=None)
            return
        started = time.time()
        evaluation = self.run_eval(out, "base") if self.recipe.eval.dataset else None
        write_json(out / "metrics.json", {"stage": "base", "status": "done", "eval": evaluation,
                                          "wall_time_s": round(time.time() - started, 1)})
        # `base_hash`: what the stages trained from; a stage that records another one is stale (`stale_stages`).
        # `eval_hash`: the evaluation every step is now scored with; a stage whose metrics record another one (a run
        # stopped while it evaluated the finished stages again) is not compared with the base (`accuracy_line`)
        write_json(out / "lineage.json", {"stage": "base", "inputs_hash": digest, "base_hash": self.base_hash,
                                          "eval_hash": self.eval_hash,
                                          "base_model": str(self.base_model), **lineage.environment()})
        self._record("base", status="done", wall_time_s=round(time.time() - started, 1), error=None, log=None)

    def run_eval(self, out: Path, step: str, adapter: Path | None = None) -> dict:
        """Held-out metrics of the base model (+ a finished stage's `adapter`), computed in a child process like
        every stage."""
        settings = self.eval_settings()
        settings_path, result = write_json(out / "eval_settings.json", dataclasses.asdict(settings)), out / "eval.json"
        cmd = self.eval_command(["-m", "posttrain.evaluate", "--settings", str(settings_path), "--model",
                                 str(self.base_model), "--tokenizer", str(self.root / "base" / "tokenizer"), "--out",
                                 str(result)])
        if adapter is not None:
            cmd += ["--adapter", str(adapter)]
        if self.recipe.base.trust_remote_code:
            cmd.append("--trust-remote-code")
        what = f"the {step} adapter" if adapter is not None else "the base model"
        console.print(f"evaluating {what} on {settings.dataset} ({settings.split})…")
        self._spawn(cmd, out / f"{step}.eval.log" if adapter is not None else out / "base.log", step)
        evaluation = json.loads(result.read_text())
        result.unlink()
        settings_path.unlink()
        return evaluation

    def eval_command(self, script: list[str]) -> list[str]:
        """An evaluation's command (or a sampling data job's): with several processes on this machine (its GPUs,
        `--num-processes`), as many processes under accelerate's launcher, each generating a share of the prompts
        (`generation.Share`), as a stage's held-out evaluation does; else one process. Only this machine's: the other
        machines of a multi-machine run wait for the next stage."""
        from .devices import accelerate_launch_args

        flags = accelerate_launch_args(None, self.num_processes)
        return [sys.executable, "-m", LAUNCHER, *flags, *script] if "--multi_gpu" in flags else [sys.executable, *script]

    def sampling_command(self, name: str, script: list[str]) -> list[str]:
        """The command of the data job `name` that samples from a model (`script`: its Python arguments): on one
        machine, as an evaluation (`eval_command`); on several, as many processes as a stage on every machine, the
        others told to join it as they join a stage (`Coordinator.announce`), each process sampling a share."""
        if not self.coordinator:
            return self.eval_command(script)
        from .devices import accelerate_launch_args

        flags = accelerate_launch_args(None, self.num_processes, self.nodes)
        self.coordinator.announce(f"data-{name}", [*flags, *script], needs=self.shared_paths())
        return [sys.executable, "-m", LAUNCHER, *flags, *script]

    def eval_settings(self):
        """The recipe's held-out evaluation, its dataset's path resolved: the same for the base model and every
        stage."""
        return dataclasses.replace(self.recipe.eval, dataset=self.substitute(self.recipe.eval.dataset))

    def held_out_hash(self) -> str:
        """What held-out metrics depend on besides the model: the evaluation's settings and data (`eval_hash`, set
        with the base model's evaluation; a finished stage evaluated with another one is evaluated again)."""
        settings = self.eval_settings()
        if not settings.dataset:
            return self.digest({"eval": None})
        return self.digest({"eval": dataclasses.asdict(settings),
                            "dataset": lineage.dataset_fingerprint(settings.dataset)})

    def reevaluate(self, stage: str) -> bool:
        """A finished stage whose held-out evaluation changed (another eval set, more tokens, a smaller batch after
        running out of memory) is evaluated again, not trained again. So is one whose stage process could not
        evaluate it (`eval_deferred`: weights sharded over its processes), in a process of its own. The new metrics
        are written before the lineage records them, so an interrupted evaluation is redone on the next run. Returns
        whether it evaluated."""
        final = self.root / stage
        record, metrics = read_json(final / "lineage.json"), read_json(final / "metrics.json")
        deferred = metrics.get("eval_deferred") if self.recipe.eval.dataset else None
        # metrics.json emptied or cut short since (`read_json`): the stage's own evaluation is gone with it
        lost = bool(self.recipe.eval.dataset) and not deferred and not metrics.get("eval")
        current = record.get("eval_hash") == self.eval_hash
        if current and not deferred and not lost:
            return False
        console.print(f"{stage}: {deferred}; the saved adapter is evaluated in one process" if deferred else
                      f"{stage}: its held-out metrics are missing from metrics.json; the finished adapter is evaluated "
                      "again" if lost and current else
                      f"{stage}: the held-out evaluation changed; the finished adapter is evaluated again")
        metrics["eval"] = self.run_eval(final, stage, adapter=final) if self.recipe.eval.dataset else None
        metrics.pop("eval_deferred", None)
        metrics.pop("promotion", None)
        write_json(final / "metrics.json", metrics)
        resolved = final / "resolved.yaml"  # what `posttrain eval RUN --stage S` reads to evaluate as the run did
        if resolved.is_file() and self.recipe.eval.dataset:
            args = {**yaml.safe_load(resolved.read_text()), **StageArguments.from_eval(self.eval_settings())}
            write_text(resolved, yaml.safe_dump(args, sort_keys=False))
        write_json(final / "lineage.json", {**record, "eval_hash": self.eval_hash})
        return True

    def promote(self, stage: str) -> None:
        """Compare a finished stage with the last evaluated step before it (`promotion`), record the comparison and
        its gate's verdict in its metrics.json and run.json, and stop the chain when the gate says so."""

        steps = ["base", *self.recipe.stages]
        metrics_path = self.root / stage / "metrics.json"
        metrics = read_json(metrics_path)
        if not metrics.get("eval"):
            return
        previous = next(((s, m["eval"]) for s in reversed(steps[:steps.index(stage)])
                         if (m := read_json(self.root / s / "metrics.json")).get("eval")), None)
        if previous is None:
            return
        record = promotion(self.recipe.gates.get(stage), previous[0], previous[1], metrics["eval"])
        metrics["promotion"] = record
        write_json(metrics_path, metrics)
        self._record(stage, gate=record["gate"])
        if record["gate"]:
            mark = "[green]passed[/green]" if record["gate"]["passed"] else "[red]failed[/red]"
            console.print(f"promote gate of {stage}: {mark}: {record['gate']['reason']}")
        if blocks_chain(record):
            self._record("run", status="stopped", stopped_by=stage, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
            self.print_summary()
            raise GateStopped(f"stage '{stage}' is worse than {previous[0]} and its promote gate stopped the run: "
                            f"{record['gate']['reason']}. The stage stays in {self.root / stage} for inspection but "
                            f"`posttrain export` refuses it (--force to override). Change the stage's settings and "
                            "run again, or relax `gate:` in the recipe.")
