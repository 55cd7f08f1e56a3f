"""Plots for the run report: training curves grouped into readable panels, accuracy by stage, an ablation scatter.

Every stage has one colour everywhere (base grey, sft blue, dpo orange, upo green); several series of one stage are
shades and line styles of that colour, held-out (`eval_*`) series are dashed with markers. Which panels a stage gets
is decided by the keys it logged, so a new TRL or UPO metric shows up (under "other") without code changes.
"""

import functools
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

STAGE_COLORS = {"base": "#7f7f7f", "sft": "#1f77b4", "dpo": "#ff7f0e", "upo": "#2ca02c"}
_SPARE_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728"]
_STYLES = ["-", "--", ":", "-."]

# Summary entries and bookkeeping, not curves.
SKIP_KEYS = {"epoch", "step", "num_tokens", "step_time", "total_flos", "train_runtime", "train_samples_per_second",
             "train_steps_per_second", "train_loss", "eval_runtime", "eval_samples_per_second",
             "eval_steps_per_second", "eval_num_tokens"}


@dataclass
class Panel:
    """One subplot: a title, a y label and the logged keys (regular expressions, full match) it draws."""

    title: str
    ylabel: str
    patterns: list[str]
    unit_range: bool = False  # a rate in [0, 1]
    diagnostic: bool = False
    series: list[str] = field(default_factory=list)


# In display order; the first panel whose pattern matches a key claims it.
PANELS = [
    Panel("Loss", "loss", [r"loss"]),
    Panel("UPO objective: PG vs λ·DPO terms", "loss", [r"upo/pg_loss", r"upo/dpo_loss"]),
    Panel("Reward per domain (raw, mean ± std)", "reward", [r"upo/reward(?:_mean)?/[^/]+(?:/mean)?"]),
    Panel("Reward (mean ± std over rollouts)", "reward", [r"reward"]),
    Panel("Reward per function (mean ± std)", "reward", [r"rewards/[^/]+/mean"]),
    Panel("Pair accuracy (chosen > rejected)", "fraction of pairs",
          [r"rewards/accuracies", r"upo/dpo_accuracy"], unit_range=True),
    Panel("Preference margin", "margin", [r"rewards/margins", r"upo/dpo_margin"]),
    Panel("Implicit rewards", "β · log-ratio", [r"rewards/chosen", r"rewards/rejected"]),
    Panel("Pair log-ratios vs reference", "log π/π_ref", [r"upo/chosen_logratio", r"upo/rejected_logratio"]),
    Panel("Pairs per step", "pairs", [r"upo/pairs(?:_online|_offline)?"]),
    Panel("Pair reward gap vs margin", "reward gap", [r"upo/pair_(?:reward_)?gap", r"upo/margin"]),
    Panel("KL to reference", "KL", [r"kl"]),
    Panel("Completion length (mean, min–max band)", "tokens", [r"completions/mean_length"]),
    Panel("Token accuracy", "fraction of tokens", [r"mean_token_accuracy"], unit_range=True),
    Panel("Log-probabilities", "log p", [r"logps/chosen", r"logps/rejected"], diagnostic=True),
    Panel("Clipped completions / zero-variance groups", "fraction",
          [r"completions/clipped_ratio", r"frac_reward_zero_std"], unit_range=True, diagnostic=True),
    Panel("Terminated completion length", "tokens", [r"completions/(?:mean|min|max)_terminated_length"],
          diagnostic=True),
    Panel("PPO clip ratios", "fraction", [r"clip_ratio/.+"], unit_range=True, diagnostic=True),
    Panel("Learning rate", "learning rate", [r"learning_rate"], diagnostic=True),
    Panel("Gradient norm", "‖g‖", [r"grad_norm"], diagnostic=True),
    Panel("Entropy", "nats", [r"entropy"], diagnostic=True),
]


def stage_color(stage: str, order: list[str] | None = None) -> str:
    if stage in STAGE_COLORS:
        return STAGE_COLORS[stage]
    extras = [s for s in (order or []) if s not in STAGE_COLORS]
    return _SPARE_COLORS[(extras.index(stage) if stage in extras else len(extras)) % len(_SPARE_COLORS)]


def shade(color: str, i: int, n: int) -> str:
    """The i-th of n shades of `color`: the colour itself first, then darker and lighter variants."""
    if n <= 1 or i == 0:
        return color
    r, g, b = (int(color[k:k + 2], 16) for k in (1, 3, 5))
    t = [-0.45, 0.45, -0.25, 0.3, -0.6, 0.55][(i - 1) % 6]
    mix = (lambda c: c + (255 - c) * t) if t > 0 else (lambda c: c * (1 + t))
    return "#" + "".join(f"{int(max(0, min(255, mix(c)))):02x}" for c in (r, g, b))


def series(log_history: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """Every numeric logged key -> [(step, value)], train logs and `eval_*` logs alike; NaN values dropped."""
    out: dict[str, list] = {}
    for entry in log_history:
        step = entry.get("step")
        if step is None or "train_runtime" in entry:
            continue
        for key, value in entry.items():
            if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                continue
            out.setdefault(key, []).append((float(step), float(value)))
    return out


def assign_panels(keys: list[str]) -> list[Panel]:
    """Panels for the logged keys, in display order; keys no panel claims go to "other" panels by prefix."""
    panels = [Panel(p.title, p.ylabel, p.patterns, p.unit_range, p.diagnostic) for p in PANELS]
    other: dict[str, Panel] = {}
    bands = {k for k in keys if _is_band(k, keys)}
    for key in sorted(keys, key=lambda k: (k.startswith("eval_"), k)):
        if key in bands:
            continue
        base = key.removeprefix("eval_")
        panel = next((p for p in panels if any(re.fullmatch(pat, base) for pat in p.patterns)), None)
        if panel is None:
            prefix = base.split("/")[0] if "/" in base else "other"
            panel = other.setdefault(prefix, Panel(f"Other: {prefix}", prefix, [], diagnostic=True))
        panel.series.append(key)
    return [p for p in panels + list(other.values()) if p.series]


def band_keys(key: str) -> tuple[str, str] | None:
    """The keys of a ± band around `key` (std, or min/max), as logged by TRL and UPO."""
    prefix, base = ("eval_", key[5:]) if key.startswith("eval_") else ("", key)
    if base == "reward":
        return (prefix + "reward_std",) * 2
    if base == "completions/mean_length":
        return prefix + "completions/min_length", prefix + "completions/max_length"
    if base.endswith("/mean"):
        return (prefix + base[:-5] + "/std",) * 2
    if base.startswith("upo/reward_mean/"):
        return (prefix + "upo/reward_std/" + base[len("upo/reward_mean/"):],) * 2
    return None


def _is_band(key: str, keys: list[str]) -> bool:
    return any(band_keys(k) and key in band_keys(k) and k != key for k in keys)


def _label(key: str, shared_prefix: str = "") -> str:
    held_out = key.startswith("eval_")
    base = key.removeprefix("eval_")
    m = re.fullmatch(r"upo/reward(?:_mean)?/([^/]+)(?:/mean)?|rewards/([^/]+)/mean", base)
    name = (m.group(1) or m.group(2)) if m else base.removeprefix(shared_prefix).removeprefix("upo/")
    return f"{name} (held-out)" if held_out else name


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buffer.getvalue()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines and CI
    import matplotlib.pyplot as plt

    # matplotlib's own defaults, not a matplotlibrc: a figure is then drawn from this module and matplotlib's version
    # alone, what `figure_key` keys it by (a reused figure would keep an earlier matplotlibrc's look)
    matplotlib.rcdefaults()
    plt.rcParams.update({"font.size": 9, "axes.titlesize": 10, "axes.titleweight": "bold", "axes.grid": True,
                         "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
                         "legend.fontsize": 8, "legend.frameon": False})
    return plt


class Reuse:
    """The figures of the report being replaced, reused where the same code would draw them from the same inputs.

    Every `posttrain run` writes its report again, also when it skips every stage as finished, and a figure costs
    ~0.3 s of CPU to draw (matplotlib lays out every label and tick): seconds per report for figures that did not
    change. `folder` is the report's `<stem>_files/`; `INDEX` there maps each figure's file name to the key of what it
    was drawn from (written by `render.write_documents` from `Image.key`). Without a folder, every figure is drawn.
    """

    INDEX = "figures.json"

    def __init__(self, folder: Path | None = None):
        self.folder = folder
        self.index = self._read_index()

    def _read_index(self) -> dict:
        if self.folder is None:
            return {}
        try:
            index = json.loads((self.folder / self.INDEX).read_text())
        except (OSError, ValueError, RecursionError):  # no earlier report, or a damaged index: draw everything
            index = {}
        return index if isinstance(index, dict) else {}

    def draw(self, name: str, figure, *args, **kwargs) -> tuple[bytes | None, str]:
        """(PNG or None, key) of `figure(*args, **kwargs)` saved as `name`: the earlier file where its key matches."""
        key = figure_key(figure, args, kwargs)
        if self.index.get(name) == key:
            try:
                earlier = (self.folder / name).read_bytes()
            except OSError:
                earlier = None
            # another report (the pipeline's, while `posttrain report` runs) may have replaced the folder since its
            # index was read: the file is reused only if the folder it was read from still keys it so
            if earlier is not None and self._read_index().get(name) == key:
                return earlier, key
        return figure(*args, **kwargs), key


def figure_key(figure, args: tuple, kwargs: dict) -> str:
    """What a figure is drawn from: the function, its arguments, this module's code and matplotlib's version."""
    inputs = json.dumps([figure.__name__, args, kwargs], sort_keys=True, default=repr)
    return hashlib.sha256(f"{_code_digest()}\0{inputs}".encode()).hexdigest()[:32]


@functools.cache  # once per process
def _code_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes() + version("matplotlib").encode()).hexdigest()


# ------------------------------------------------------------------------------------------------------------ figures
def stage_curves(stage: str, log_history: list[dict], order: list[str], normalized_by: str | None = None,
                 diagnostics: bool = False) -> bytes | None:
    """The main panels (or with `diagnostics`, the diagnostic ones) of one stage's training logs as a PNG; None where
    there is nothing.

    normalized_by (`str`, *optional*): the stage's `normalize_rewards_by`; TRL's reward keys are then standardised
    per group, and the panel titles say so (UPO's `upo/reward/<group>/*` stay raw)."""
    data = series(log_history)
    panels = assign_panels(list(data))
    if normalized_by:
        for panel in panels:
            if panel.title.startswith("Reward") and "raw" not in panel.title:
                panel.title = f"{panel.title.split(' (')[0]}, normalised per {normalized_by}"
    panels = [p for p in panels if p.diagnostic == diagnostics]
    title = f"{stage}: diagnostics" if diagnostics else f"{stage}: training curves"
    return _panel_grid(panels, data, stage_color(stage, order), title) if panels else None


def _panel_grid(panels: list[Panel], data: dict, color: str, title: str) -> bytes:
    plt = pyplot()
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    height = 2.9 * rows + 0.45
    fig, axes = plt.subplots(rows, cols, figsize=(4.0 * cols, height), squeeze=False)
    # fixed margins, not layout="constrained": its solver redraws the figure several times (seconds per report)
    fig.subplots_adjust(left=0.9 / (4.0 * cols), right=1 - 0.1 / cols, top=1 - 0.75 / height,
                        bottom=0.5 / height, wspace=0.42, hspace=0.55)
    fig.suptitle(title, fontsize=12, fontweight="bold", color=color, y=1 - 0.12 / height)
    for ax, panel in zip(axes.flat, panels):
        _draw_panel(ax, panel, data, color)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    return png(fig)


def _draw_panel(ax, panel: Panel, data: dict, color: str) -> None:
    bases = list(dict.fromkeys(k.removeprefix("eval_") for k in panel.series))
    prefixes = {b.split("/")[0] + "/" if "/" in b else "" for b in bases}
    shared = prefixes.pop() if len(prefixes) == 1 and len(bases) > 1 else ""  # "clip_ratio/": said in the title
    for key in panel.series:
        held_out = key.startswith("eval_")
        index = bases.index(key.removeprefix("eval_"))
        tint = shade(color, index, len(bases))
        xs, ys = zip(*data[key])
        few = len(xs) <= 25
        ax.plot(xs, ys, color=tint, linestyle="--" if held_out else _STYLES[index % len(_STYLES)],
                marker="o" if held_out or few else None, markersize=3.5 if held_out else 2.5, linewidth=1.6,
                label=_label(key, shared))
        band = band_keys(key)
        if band and band[0] in data and band[1] in data:
            low, high = dict(data[band[0]]), dict(data[band[1]])
            steps = [x for x in xs if x in low and x in high]
            centre = dict(data[key])
            lo = [low[x] if band[0] != band[1] else centre[x] - low[x] for x in steps]
            hi = [high[x] if band[0] != band[1] else centre[x] + high[x] for x in steps]
            ax.fill_between(steps, lo, hi, color=tint, alpha=0.15, linewidth=0)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(_integer_ticks())
    ax.set_ylabel(panel.ylabel)
    if panel.unit_range:
        ax.set_ylim(-0.03, 1.03)
    if len(panel.series) > 1:
        ax.legend(loc="best")


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True, nbins=8)


def run_loss(stages: list[tuple[str, list[dict]]], order: list[str]) -> bytes | None:
    """The training loss of every stage on one axis, steps laid end to end, stage boundaries marked."""
    segments = [(name, series(logs).get("loss", [])) for name, logs in stages]
    segments = [(name, pts) for name, pts in segments if pts]
    if len(segments) < 2:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.4), layout="constrained")
    offset = 0.0
    for name, pts in segments:
        color = stage_color(name, order)
        xs = [offset + x for x, _ in pts]
        end = offset + max(x for x, _ in pts)
        ax.axvspan(offset, end, color=color, alpha=0.07, linewidth=0)
        ax.plot(xs, [y for _, y in pts], color=color, linewidth=1.8, marker="o" if len(xs) <= 25 else None,
                markersize=3, label=name)
        ax.text((offset + end) / 2, 1.01, name, transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                color=color, fontweight="bold")
        if offset > 0:
            ax.axvline(offset, color="#444", linestyle="--", linewidth=1)
        offset = end
    ax.set_title("Training loss across stages (each stage's own objective)", pad=18)
    ax.set_xlabel("optimizer step, stages laid end to end")
    ax.set_ylabel("training loss")
    ax.legend(loc="upper right")
    return png(fig)


def eval_bars(evals: list[tuple[str, dict]], order: list[str]) -> bytes | None:
    """Held-out rates (accuracy, format, stop rate, accuracy per group) as bars, one colour per stage."""
    evals = [(name, ev) for name, ev in evals if ev]
    if not evals:
        return None
    metrics = [m for m in ("accuracy", "format", "stop_rate") if any(ev.get(m) is not None for _, ev in evals)]
    groups = sorted({g for _, ev in evals for g in (ev.get("by_group") or {})})
    labels = [m.replace("_", " ") for m in metrics] + [_group_label(g) for g in groups]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(12, 3.6), layout="constrained")
    width = 0.8 / len(evals)
    for i, (name, ev) in enumerate(evals):
        values = [ev.get(m) for m in metrics] + [(ev.get("by_group") or {}).get(g) for g in groups]
        xs = [j + (i - (len(evals) - 1) / 2) * width for j in range(len(labels))]
        kept = [(x, v) for x, v in zip(xs, values) if v is not None]
        bars = ax.bar([x for x, _ in kept], [v for _, v in kept], width * 0.92, color=stage_color(name, order),
                      label=name)
        if len(labels) * len(evals) <= 40:
            ax.bar_label(bars, labels=[f"{v:.0%}" for _, v in kept], fontsize=7, padding=1)
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 6 else 0, ha="right" if
                  len(labels) > 6 else "center")
    ax.set_ylim(0, 1.12)
    ax.set_ylabel("fraction of held-out prompts")
    ax.set_title("Held-out evaluation by stage")
    ax.legend(loc="upper left", ncols=len(evals))
    return png(fig)


def _group_label(group: str) -> str:
    kind, _, name = group.partition("/")
    if kind == "mode":
        return {"thinking": "acc · thinking on", "non_thinking": "acc · thinking off"}.get(name, f"acc · {name}")
    return f"acc · {name or kind}"


def proxy_vs_true(points: list[tuple[str, float, float]], xlabel: str) -> bytes | None:
    """Ablation scatter: proxy reward (x) against held-out accuracy (y), one labelled point per run."""
    if not points:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for i, (name, proxy, accuracy) in enumerate(points):
        color = _SPARE_COLORS[i % len(_SPARE_COLORS)]
        ax.scatter([proxy], [accuracy], s=45, color=color, zorder=3)
        ax.annotate(name, (proxy, accuracy), textcoords="offset points", xytext=(6, 4), fontsize=8, color=color)
    ax.margins(x=0.25)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out accuracy (verifier)")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Proxy reward vs true accuracy")
    return png(fig)
