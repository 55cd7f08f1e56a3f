"""Comparing runs (an ablation over λ, β, online vs offline…): true held-out accuracy against the proxy reward.

A policy can raise the reward it is trained on without getting more answers right (reward hacking, or a verifier
that is too lenient); showing the two side by side, per run, is how an ablation is read. Both numbers come from the
runs' own metrics.json: accuracy from one stage, the same for every run (`read_at`), the proxy from the training logs.
A run that did not get to that stage (a promote gate stopped it earlier, a stage failed) is not measured there: its
earlier stages are other models, so averaging or pairing them with the other runs' would compare unlike things.

A run folder lists the runs it is compared with in run.json (`"ablation": {"runs": ["../other-run", ...]}`, paths
relative to the run folder or absolute), or the caller passes them (`posttrain report RUN --compare OTHER ...`).
"""

import os
import re
from pathlib import Path

from ..runs import MACHINE_PATH_KEYS
from ..stats import format_p, mean_interval, paired_evals
from . import plots
from .blocks import NOT_MEASURED, STATUS_TEXT, Cell, Image, Para, Table, fmt, heading, num_cell
from .load import RunView, load_run, same_prompts

PROXY_KEYS = ("reward", "rewards/accuracies")  # GRPO/UPO training reward; DPO's implicit-reward accuracy
RAW_DOMAIN_REWARD = r"upo/reward(?:_mean)?/[^/]+(?:/mean)?"
PROXY_WINDOW = 5  # the proxy is the mean of the last logged steps: one step is too noisy to compare runs by
NOT_SETTINGS = MACHINE_PATH_KEYS | {"dataset_name", "eval_dataset", "upo_offline_dataset", "logging_steps",
                                    "save_steps", "save_strategy", "save_total_limit", "report_to", "project",
                                    "run_name"}


def proxy_reward(log_history: list[dict], normalized: bool = False) -> tuple[str, float, int] | None:
    """(what was measured, its mean over the last PROXY_WINDOW training logs, how many), or None if never logged.

    With `normalize_rewards_by` (`normalized`), TRL's `reward` is standardised per group (its mean is ~0 by
    construction), so the raw per-domain means UPO logs (`upo/reward/<domain>/mean`) are used, averaged over
    domains."""
    found = [p for p in (_step_proxy(e, normalized) for e in log_history) if p]
    if not found:
        return None
    label = found[-1][0]
    window = [v for name, v in found if name == label][-PROXY_WINDOW:]
    return label, sum(window) / len(window), len(window)


def _step_proxy(entry: dict, normalized: bool) -> tuple[str, float] | None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v

    raw = [v for k, v in entry.items() if re.fullmatch(RAW_DOMAIN_REWARD, k) and number(v)] if normalized else []
    if raw:
        return "raw reward, mean over domains", sum(raw) / len(raw)
    return next(((f"`{k}`", float(entry[k])) for k in PROXY_KEYS if number(entry.get(k))), None)


def read_at(runs: list[RunView]) -> str:
    """The one stage every run is read at: where the runs that finished ended (with `--until`, the ablation's
    `until`), else the last stage of the first run's recipe."""
    ends = set()
    for run in runs:
        done = [s.name for s in run.stages if s.status == "done"]
        if run.state.get("steps", {}).get("run", {}).get("status") == "done" and done:
            ends.add(done[-1])
    if len(ends) == 1:
        return ends.pop()
    return (runs[0].state.get("order") or [s.name for s in runs[0].stages])[-1]


def where_it_stopped(run: RunView, stage: str) -> str:
    """Why `run` has no evaluation at `stage`: `stopped by the dpo promote gate`, `dpo failed`, `upo not started`."""
    state = run.state.get("steps", {}).get("run", {})
    if state.get("status") == "stopped":
        return f"stopped by the {state['stopped_by']} promote gate" if state.get("stopped_by") else "stopped by a gate"
    failed = next((s.name for s in run.stages if s.status == "failed"), None)
    if failed:
        return f"{failed} failed"
    view = run.stage(stage)
    if view is None:
        return f"no {stage} stage"
    if view.status != "done":
        return f"{stage} {STATUS_TEXT.get(view.status, view.status)}"
    if not got_to(run, stage):
        return f"its last run {state.get('status')} before {stage}; the {stage} there is an earlier run's"
    return "no evaluation"


def got_to(run: RunView, stage: str) -> bool:
    """Whether the run's latest attempt evaluated `stage`: it finished, or it ended (a promote gate, a failed or
    interrupted stage) there or later. A `<stage>/` an earlier attempt left is another plan's result, not this run's:
    a variant whose run failed this time in its own data job, say, still holds the upo stage of the last ablation."""
    state = run.state.get("steps", {}).get("run", {})
    if state.get("status") in (None, "done"):
        return True
    names = [s.name for s in run.stages]
    if state.get("stopped_by") in names:  # its gate judged that stage's own evaluation
        return names.index(state["stopped_by"]) >= names.index(stage)
    ended = next((s.name for s in run.stages if s.status in ("failed", "running")), None)
    return ended is not None and names.index(ended) > names.index(stage)


def comparison_rows(runs: list[Path], stage: str | None = None) -> list[dict]:
    """One row per run, all at `stage` (default `read_at`): accuracy there and at base, proxy reward, resolved
    settings; `where` says where a run without that stage's evaluation stopped."""
    views = [load_run(root) for root in runs]
    stage = stage or read_at(views)
    rows = [_row(run, stage) for run in views]
    # runs of one recipe in other output folders (a run of an earlier version and its rerun) share a name: their
    # folders tell them apart
    names = [r["run"] for r in rows]
    for r in rows:
        if names.count(r["run"]) > 1:
            r["run"] = str(r["root"])
    return rows


def _row(run: RunView, stage: str) -> dict:
    final, base = run.stage(stage), run.stage("base")
    # not a stale stage's, nor one an earlier attempt left
    evaluation = final.eval if final and final.status == "done" and got_to(run, stage) else None
    proxy = None
    names = [view.name for view in run.trained]
    # the last stage up to `stage` that logged a proxy: not one after it (a variant folder an earlier, longer
    # ablation trained on to the end, now read at its `until`)
    upto = run.trained[:names.index(stage) + 1] if stage in names else run.trained
    for view in reversed([view for view in upto if got_to(run, view.name)]):
        proxy = proxy_reward(view.log_history, bool(view.resolved.get("normalize_rewards_by")))
        if proxy:
            proxy = (*proxy, view.name)
            break
    measured = evaluation or {}
    return {
        "run": run.name, "root": run.root, "stage": stage, "status": final.status if final else "not started",
        "where": "" if evaluation else where_it_stopped(run, stage), "accuracy": measured.get("accuracy"),
        "heldout_proxy": measured.get("proxy_reward"), "format": measured.get("format"),
        "stop_rate": measured.get("stop_rate"),
        "base_accuracy": (base.eval or {}).get("accuracy") if base and base.eval else None,
        # a difference to base only on the same prompts
        "base_same_prompts": bool(evaluation and base and base.eval and same_prompts(base.eval, evaluation)),
        "proxy": proxy, "settings": dict(final.resolved) if final else {}, "eval": evaluation,
    }


def varied_settings(rows: list[dict]) -> list[str]:
    """Resolved arguments whose values differ between the runs (what the ablation varied), UPO's first."""
    rows = [r for r in rows if r["settings"]]  # a run that never got to the stage varied nothing there
    keys = {k for r in rows for k in r["settings"] if k not in NOT_SETTINGS}
    varied = [k for k in keys if len({repr(r["settings"].get(k)) for r in rows}) > 1]
    return sorted(varied, key=lambda k: (not k.startswith("upo_"), k != "beta", k))


def comparison(runs: list[Path], stage: str | None = None, figures: plots.Reuse | None = None) -> list:
    """The ablation section: a table of true accuracy vs proxy reward per run at `stage` (default `read_at`), and
    their scatter plot (reused from `figures` where unchanged)."""
    rows = comparison_rows(runs, stage)
    settings = varied_settings(rows)
    table = []
    for r in rows:
        proxy = r["proxy"]
        delta = ("not measured" if r["accuracy"] is None or r["base_accuracy"] is None else "different prompts"
                 if not r["base_same_prompts"] else f"{(r['accuracy'] - r['base_accuracy']) * 100:+.1f} pts")
        table.append([f"**{r['run']}**", f"{r['stage']}: not measured ({r['where']})" if r["where"] else r["stage"]] +
                     [Cell(fmt(r["settings"].get(k)) if k in r["settings"] else "—", "mono", True)
                      for k in settings] +
                     [num_cell(r["accuracy"], "rate"), Cell(delta, "num" if "pts" in delta else "missing"),
                      num_cell(r["format"], "rate"), num_cell(r["stop_rate"], "rate"),
                      num_cell(r["heldout_proxy"]),
                      Cell(f"{proxy[1]:.3g}", "num") if proxy else NOT_MEASURED,
                      f"{proxy[0]} of {proxy[3]}, last {proxy[2]} logs" if proxy else ""])
    header = ["run", "evaluated stage"] + [f"`{k}`" for k in settings] + [
        "held-out accuracy", "vs base", "format", "stopped", "held-out proxy", "training reward",
        "reward measured as"]
    blocks = [heading("Ablation"),
              Para(f"True accuracy is the verifier on held-out prompts after `{rows[0]['stage']}`, the same stage in "
                   "every run (where the finished runs end): a run that did not get there is not measured and says "
                   "where it stopped, and \"vs base\" is given only on the same prompts. The format (think tags as "
                   "the mode asks) and stopped (the answer ended with EOS) are scored on the same answers, and the "
                   "held-out proxy is the deliberately hackable `hackable_length` reward on them; the training reward "
                   "is what the stage optimised, averaged over its last logged steps. A proxy that rises while "
                   "accuracy does not is the signature of reward hacking."),
              Table(header, table, "Setting columns: the resolved arguments that differ between these runs.")]
    # x: the held-out proxy, one measure for every run, where all runs have it; else what each run trained on
    held_out = all(r["heldout_proxy"] is not None for r in rows if r["accuracy"] is not None)
    points = [(r["run"], r["heldout_proxy"] if held_out else (r["proxy"] or (0, None))[1], r["accuracy"])
              for r in rows if r["accuracy"] is not None]
    points = [p for p in points if p[1] is not None]
    prefix = os.path.commonprefix([name for name, _, _ in points]) if len(points) > 1 else ""
    prefix = prefix[: prefix.rfind("-") + 1]  # "smollm2-135m-ablation-grpo" → "grpo": the variant names the point
    points = [(name[len(prefix):], x, y) for name, x, y in points]
    xlabel = ("hackable proxy on the held-out answers" if held_out else "proxy: training reward, last logged steps")
    name = "ablation_proxy_vs_true.png"
    figure, key = (figures or plots.Reuse()).draw(name, plots.proxy_vs_true, points, xlabel)
    if figure:
        blocks.append(Image(name, figure, "proxy reward vs held-out accuracy",
                            "Runs without both numbers are left out of the plot (see the table).", key))
    return blocks


def variant_summaries(groups: dict[str, list[Path]], baseline: str, stage: str | None = None) -> list[dict]:
    """Each variant's held-out accuracy over its seeds (mean and 95 % t-interval), and its difference to `baseline`
    paired twice: seed by seed (same seed of the varied stage) and prompt by prompt (same held-out prompts). The
    differences' mean and t-interval over seeds decide whether a variant beats the baseline; the count of seeds whose
    own McNemar test is significant shows how often one seed alone would have said so. Every run is read at `stage`
    (default `read_at`); a run without its evaluation there is left out of the mean and the pairs, and listed in
    `missing` with where it stopped."""
    everything = iter(comparison_rows([root for roots in groups.values() for root in roots], stage))
    rows = {name: [next(everything) for _ in roots] for name, roots in groups.items()}
    summaries = []
    for name, runs in rows.items():
        accuracies = [r["accuracy"] for r in runs if r["accuracy"] is not None]
        mean, low, high = mean_interval(accuracies)
        proxies = [r["heldout_proxy"] for r in runs if r["heldout_proxy"] is not None]
        summary = {"name": name, "stage": runs[0]["stage"] if runs else stage, "accuracies": accuracies, "mean": mean,
                   "interval": (max(0.0, low), min(1.0, high)),  # a t-interval knows nothing of a rate's bounds
                   "proxy": mean_interval(proxies)[0] if proxies else None, "baseline": name == baseline,
                   "missing": [f"{r['run']}: {r['where']}" for r in runs if r["accuracy"] is None]}
        if name != baseline:  # a run not measured at the stage has no evaluation there, so it pairs with nothing
            paired = [paired_evals(b["eval"], r["eval"]) for b, r in zip(rows[baseline], runs)]
            differences = [c.difference for c in paired if c]
            d_mean, d_low, d_high = mean_interval(differences)
            # the same difference on every seed gives a t-interval of width 0: no spread measured, not certainty
            spread = len(differences) > 1 and max(differences) - min(differences) > 1e-9
            if not spread:
                d_low = d_high = d_mean  # no interval (shown blank)
            # as the accuracies' own: a difference of two rates lies within ±1 (±100 points)
            summary.update(differences=differences, difference=d_mean,
                           difference_interval=(max(-1.0, d_low), min(1.0, d_high)),
                           significant_seeds=(sum(c.significant and c.difference > 0 for c in paired if c),
                                              sum(c.significant and c.difference < 0 for c in paired if c)),
                           verdict=("not measured" if not differences else one_seed_verdict(paired)
                                    if len(differences) < 2 else "same difference every seed: no interval"
                                    if not spread else "better" if d_low > 0 else "worse" if d_high < 0
                                    else "n.s."))
        summaries.append(summary)
    return summaries


def one_seed_verdict(paired: list) -> str:
    """With one measured seed, no interval over seeds: the exact McNemar test on its held-out prompts, as a stage is
    compared with the one before (a seed's own luck in training is not measured)."""
    c = next(c for c in paired if c)
    called = ("better" if c.difference > 0 else "worse") if c.significant else "n.s."
    return f"one seed: {called} (McNemar p={format_p(c.p_value)})"


def over_seeds(groups: dict[str, list[Path]], baseline: str, stage: str | None = None) -> list:
    """`variant_summaries` as the comparison's first table."""
    table = []
    summaries = variant_summaries(groups, baseline, stage)
    for v in summaries:
        accuracies, (low, high), missing = v["accuracies"], v["interval"], v["missing"]
        per_seed = [f"{a:.1%}" for a in accuracies] + [f"not measured ({m})" for m in missing]
        cells = [f"**{v['name']}**", Cell(f"{len(accuracies)} of {len(accuracies) + len(missing)}" if missing
                                          else str(len(accuracies)), "num"),
                 Cell(f"{v['mean']:.1%}" if accuracies else "not measured", "num"),
                 Cell(f"{low:.1%} – {high:.1%}" if len(accuracies) > 1 else "one seed: none", "num"),
                 Cell(", ".join(per_seed), "num" if not missing else ""),
                 Cell(f"{v['proxy']:.3g}" if v["proxy"] is not None else "not measured", "num")]
        if v["baseline"]:
            table.append(cells + ["baseline", "", "", ""])
            continue
        differences, (d_low, d_high), verdict = v["differences"], v["difference_interval"], v["verdict"]
        table.append(cells + [Cell(f"{100 * v['difference']:+.1f} pts" if differences else "not measured", "num"),
                              Cell(f"{100 * d_low:+.1f} to {100 * d_high:+.1f}" if d_high > d_low else "", "num"),
                              Cell(verdict, "ok" if verdict == "better" else "bad" if verdict == "worse" else ""),
                              Cell("{} better, {} worse of {}".format(*v["significant_seeds"], len(differences)),
                                   "num")])
    header = ["variant", "seeds", "held-out accuracy (mean)", "95 % interval over seeds", "per seed",
              "held-out proxy (mean)", f"vs {baseline}", "95 % interval of the difference", "verdict",
              "seeds with p < 0.05 alone"]
    return [heading("Variants over seeds"),
            Para(f"Held-out accuracy after `{summaries[0]['stage'] if summaries else stage}` in every run; a seed "
                 "that did not get there (a promote gate stopped it earlier, a stage failed) is not measured, left "
                 "out of the mean and paired with nothing. "
                 f"Each variant ran once per seed of its varied stage (the shared stages ran once). Intervals are "
                 "95 % Student t over seeds, so with few seeds they are wide (t = 12.7 with 2, 4.3 with 3): a "
                 "difference is called better or worse only when its interval excludes 0. Differences to "
                 f"`{baseline}` are paired: same seed, same held-out prompts. With one seed there is no interval "
                 "over seeds: the verdict is the exact McNemar test on the held-out prompts, which measures the "
                 "evaluation's luck but not the training seed's."),
            Table(header, table, "Per-run details follow in the table below.")]
