"""Comparing runs (an ablation over λ, β, online vs offline…): true held-out accuracy against the proxy reward.

A policy can raise the reward it is trained on without getting more answers right (reward hacking, or a verifier
that is too lenient); showing the two side by side, per run, is how an ablation is read. Both numbers come from the
runs' own metrics.json: accuracy from the last evaluated stage, the proxy from that stage's training logs.

A run folder lists the runs it is compared with in run.json (`"ablation": {"runs": ["../other-run", ...]}`, paths
relative to the run folder or absolute), or the caller passes them (`posttrain report RUN --compare OTHER ...`).
"""

import os
import re
from pathlib import Path

from ..runs import MACHINE_PATH_KEYS
from ..stats import mean_interval, paired_evals
from . import plots
from .blocks import NOT_MEASURED, Cell, Image, Para, Table, fmt, heading, num_cell
from .load import load_run

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


def comparison_rows(runs: list[Path]) -> list[dict]:
    """One row per run: its last evaluated stage, accuracy there and at base, proxy reward, resolved settings."""
    rows = []
    for root in runs:
        run = load_run(root)
        evaluated = [s for s in run.trained if s.eval]
        final = evaluated[-1] if evaluated else (run.trained[-1] if run.trained else None)
        base = run.stage("base")
        proxy = None
        for stage in reversed(run.trained):  # the last trained stage that logged a proxy
            proxy = proxy_reward(stage.log_history, bool(stage.resolved.get("normalize_rewards_by")))
            if proxy:
                proxy = (*proxy, stage.name)
                break
        rows.append({
            "run": run.name, "root": Path(root), "stage": final.name if final else None,
            "status": final.status if final else "not started",
            "accuracy": (final.eval or {}).get("accuracy") if final else None,
            "heldout_proxy": (final.eval or {}).get("proxy_reward") if final else None,
            "format": (final.eval or {}).get("format") if final else None,
            "stop_rate": (final.eval or {}).get("stop_rate") if final else None,
            "base_accuracy": (base.eval or {}).get("accuracy") if base and base.eval else None,
            "proxy": proxy, "settings": dict(final.resolved) if final else {}, "eval": final.eval if final else None,
        })
    return rows


def varied_settings(rows: list[dict]) -> list[str]:
    """Resolved arguments whose values differ between the runs (what the ablation varied), UPO's first."""
    keys = {k for r in rows for k in r["settings"] if k not in NOT_SETTINGS}
    varied = [k for k in keys if len({repr(r["settings"].get(k)) for r in rows}) > 1]
    return sorted(varied, key=lambda k: (not k.startswith("upo_"), k != "beta", k))


def comparison(runs: list[Path]) -> list:
    """The ablation section: a table of true accuracy vs proxy reward per run, and their scatter plot."""
    rows = comparison_rows(runs)
    settings = varied_settings(rows)
    table = []
    for r in rows:
        proxy = r["proxy"]
        delta = (f"{(r['accuracy'] - r['base_accuracy']) * 100:+.1f} pts"
                 if r["accuracy"] is not None and r["base_accuracy"] is not None else "not measured")
        table.append([f"**{r['run']}**", r["stage"] or NOT_MEASURED] +
                     [Cell(fmt(r["settings"].get(k)) if k in r["settings"] else "—", "mono") for k in settings] +
                     [num_cell(r["accuracy"], "rate"), Cell(delta, "num" if "pts" in delta else "missing"),
                      num_cell(r["format"], "rate"), num_cell(r["stop_rate"], "rate"),
                      num_cell(r["heldout_proxy"]),
                      Cell(f"{proxy[1]:.3g}", "num") if proxy else NOT_MEASURED,
                      f"{proxy[0]} of {proxy[3]}, last {proxy[2]} logs" if proxy else ""])
    header = ["run", "evaluated stage"] + [f"`{k}`" for k in settings] + [
        "held-out accuracy", "vs base", "format", "stopped", "held-out proxy", "training reward",
        "reward measured as"]
    blocks = [heading("Ablation"),
              Para("True accuracy is the verifier on held-out prompts after the run's last evaluated stage; the "
                   "format (think tags as the mode asks) and stopped (the answer ended with EOS) are scored on the "
                   "same answers, and the held-out proxy is the deliberately hackable `hackable_length` reward on them; "
                   "the training reward is what the stage optimised, averaged over its last logged steps. A proxy "
                   "that rises while accuracy does not is the signature of reward hacking."),
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
    figure = plots.proxy_vs_true(points, xlabel)
    if figure:
        blocks.append(Image("ablation_proxy_vs_true.png", figure, "proxy reward vs held-out accuracy",
                            "Runs without both numbers are left out of the plot (see the table)."))
    return blocks


def variant_summaries(groups: dict[str, list[Path]], baseline: str) -> list[dict]:
    """Each variant's held-out accuracy over its seeds (mean and 95 % t-interval), and its difference to `baseline`
    paired twice: seed by seed (same seed of the varied stage) and prompt by prompt (same held-out prompts). The
    differences' mean and t-interval over seeds decide whether a variant beats the baseline; the count of seeds whose
    own McNemar test is significant shows how often one seed alone would have said so."""
    rows = {name: comparison_rows(roots) for name, roots in groups.items()}
    summaries = []
    for name, runs in rows.items():
        accuracies = [r["accuracy"] for r in runs if r["accuracy"] is not None]
        mean, low, high = mean_interval(accuracies)
        proxies = [r["heldout_proxy"] for r in runs if r["heldout_proxy"] is not None]
        summary = {"name": name, "accuracies": accuracies, "mean": mean,
                   "interval": (max(0.0, low), min(1.0, high)),  # a t-interval knows nothing of a rate's bounds
                   "proxy": mean_interval(proxies)[0] if proxies else None, "baseline": name == baseline}
        if name != baseline:
            paired = [paired_evals(b["eval"], r["eval"]) for b, r in zip(rows[baseline], runs)]
            differences = [c.difference for c in paired if c]
            d_mean, d_low, d_high = mean_interval(differences)
            summary.update(differences=differences, difference=d_mean, difference_interval=(d_low, d_high),
                           significant_seeds=(sum(c.significant and c.difference > 0 for c in paired if c),
                                              sum(c.significant and c.difference < 0 for c in paired if c)),
                           verdict=("not measured" if not differences else "one seed: no interval"
                                    if len(differences) < 2 else "better" if d_low > 0 else "worse" if d_high < 0
                                    else "n.s."))
        summaries.append(summary)
    return summaries


def over_seeds(groups: dict[str, list[Path]], baseline: str) -> list:
    """`variant_summaries` as the comparison's first table."""
    table = []
    for v in variant_summaries(groups, baseline):
        accuracies, (low, high) = v["accuracies"], v["interval"]
        cells = [f"**{v['name']}**", Cell(str(len(accuracies)), "num"),
                 Cell(f"{v['mean']:.1%}" if accuracies else "not measured", "num"),
                 Cell(f"{low:.1%} – {high:.1%}" if len(accuracies) > 1 else "one seed: none", "num"),
                 Cell(", ".join(f"{a:.1%}" for a in accuracies), "num"),
                 Cell(f"{v['proxy']:.3g}" if v["proxy"] is not None else "not measured", "num")]
        if v["baseline"]:
            table.append(cells + ["baseline", "", "", ""])
            continue
        differences, (d_low, d_high), verdict = v["differences"], v["difference_interval"], v["verdict"]
        table.append(cells + [Cell(f"{100 * v['difference']:+.1f} pts" if differences else "not measured", "num"),
                              Cell(f"{100 * d_low:+.1f} to {100 * d_high:+.1f}" if len(differences) > 1 else "",
                                   "num"),
                              Cell(verdict, "ok" if verdict == "better" else "bad" if verdict == "worse" else ""),
                              Cell("{} better, {} worse of {}".format(*v["significant_seeds"], len(differences)),
                                   "num")])
    header = ["variant", "seeds", "held-out accuracy (mean)", "95 % interval over seeds", "per seed",
              "held-out proxy (mean)", f"vs {baseline}", "95 % interval of the difference", "verdict",
              "seeds with p < 0.05 alone"]
    return [heading("Variants over seeds"),
            Para(f"Each variant ran once per seed of its varied stage (the shared stages ran once). Intervals are "
                 f"95 % Student t over seeds, so with 3 seeds they are wide (t = 4.3): a difference is called better or "
                 f"worse only when its interval excludes 0. Differences to `{baseline}` are paired: same seed, same "
                 "held-out prompts."),
            Table(header, table, "Per-run details follow in the table below.")]
