"""Inputs and outputs the data jobs must survive: an output_dir that holds the user's files, YAML of the wrong type,
files with a BOM or that cannot be read at all, broken JSON arrays, huge CSV cells, lone surrogates, folders that are
not datasets, malformed registries, an unwritable or full disk, and interruptions. Each ends in one `UserError` that
names the file, line or key, or is handled without losing data."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from data_prep import build as build_module
from data_prep import build_preference_set, build_sft_set, build_verifiable_tasks, card, validate
from posttrain import datajobs
from posttrain.errors import Terminated, UserError

ROOT = Path(__file__).resolve().parent.parent
ROWS = [{"instruction": f"question number {i} about topic {i * 7}", "output": f"answer {i}"} for i in range(4)]


def jsonl(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def build(*args) -> int:
    return build_sft_set.main([*map(str, args), "--test_size", "0"])


def config(tmp_path, **options) -> Path:
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(options))
    return path


# 1. output_dir never replaces what a data job did not write, nor an input -----------------------------------------
def test_output_dir_holding_the_inputs_is_refused(tmp_path):
    folder = tmp_path / "D"
    folder.mkdir()
    source = jsonl(folder / "mydata.jsonl")
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="output folder .*D holds the input .*mydata.jsonl"):
        build("--sources", source, "--output_dir", folder, "--overwrite")
    with pytest.raises(UserError, match="is the input"):
        build("--sources", source, "--output_dir", source, "--overwrite")
    assert sorted(p.name for p in folder.iterdir()) == ["mydata.jsonl", "notes.txt"] and source.is_file()


def test_an_output_holding_a_decontamination_set_is_refused(tmp_path):
    source, out = jsonl(tmp_path / "a.jsonl"), tmp_path / "out"
    build("--sources", source, "--output_dir", out)
    with pytest.raises(UserError, match="holds the input .*train.parquet"):
        build("--sources", source, "--output_dir", out, "--overwrite", "--decontaminate", out / "train.parquet")
    assert (out / "train.parquet").is_file()


def test_a_folder_or_file_no_job_wrote_is_never_replaced(tmp_path):
    source = jsonl(tmp_path / "a.jsonl")
    mine, other = tmp_path / "mine", tmp_path / "file.txt"
    mine.mkdir()
    (mine / "f").write_text("keep")
    other.write_text("keep")
    for out in (mine, other):
        with pytest.raises(UserError, match="no data job wrote \\(no card.json\\)"):
            build("--sources", source, "--output_dir", out, "--overwrite")
    with pytest.raises(UserError, match="no data job wrote"):  # a generator, without --overwrite as before
        build_verifiable_tasks.main(["--output_dir", str(mine), "--n_train", "4", "--n_test", "1"])
    assert (mine / "f").read_text() == "keep" and other.read_text() == "keep"


def test_a_generator_replaces_its_own_earlier_output(tmp_path):
    out = tmp_path / "tasks"
    for n_train in (4, 6):  # `posttrain run` rebuilds a generator's data into its earlier folder
        assert build_verifiable_tasks.main(["--output_dir", str(out), "--n_train", str(n_train), "--n_test", "1"]) == 0
    assert json.loads((out / "card.json").read_text())["counts"][0]["after"] == 6


# 2. --config values are type-checked; one path or mapping is a list of one ------------------------------------------
@pytest.mark.parametrize("options, named", [
    ({"test_size": "abc"}, "data.yaml: test_size: 'abc' (str) is not a valid float"),
    ({"seed": "x"}, "data.yaml: seed: 'x' (str) is not a valid int"),
    ({"output_dir": ["a", "b"]}, "data.yaml: output_dir: ['a', 'b'] (list) is not a valid str"),
    ({"overwrite": "false"}, "data.yaml: overwrite: 'false' (str) is not a valid bool"),
    ({"decontaminate": [1]}, "data.yaml: decontaminate: [1]"),
    ({"sources": [{"path": "SRC", "weight": "abc"}]}, "weight: 'abc' (str) is not a valid float"),
], ids=["test_size", "seed", "output_dir", "overwrite-string", "decontaminate-item", "source-weight"])
def test_yaml_values_of_the_wrong_type(tmp_path, options, named):
    source = str(jsonl(tmp_path / "a.jsonl"))
    options = {"sources": [source], "output_dir": str(tmp_path / "out"), **options}
    options["sources"] = [{**s, "path": source} if isinstance(s, dict) else s for s in options["sources"]]
    with pytest.raises(UserError, match=named.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_sft_set.main(["--config", str(config(tmp_path, **options))])
    assert not (tmp_path / "out").exists()


def test_a_single_source_or_eval_set_is_a_list_of_one(tmp_path):
    source, evals = jsonl(tmp_path / "a.jsonl"), jsonl(tmp_path / "eval.jsonl", ROWS[:1])
    path = config(tmp_path, sources=str(source), decontaminate=str(evals), output_dir=str(tmp_path / "out"),
                  test_size=0, decontam_ngram=3)
    build_sft_set.main(["--config", str(path)])
    card_facts = json.loads((tmp_path / "out" / "card.json").read_text())
    assert [s["name"] for s in card_facts["sources"]] == ["a"]
    assert card_facts["decontamination"]["eval_sets"] == [str(evals)] and card_facts["decontamination"]["removed"] == 1


def test_a_flag_of_the_wrong_type(tmp_path):
    with pytest.raises(UserError, match="--seed: None"):
        build("--sources", jsonl(tmp_path / "a.jsonl"), "--output_dir", tmp_path / "out", "--seed", "null")


# 3. a UTF-8 byte order mark is not part of the data ------------------------------------------------------------------
@pytest.mark.parametrize("name, text", [
    ("data.csv", "instruction,output\nq,a\n"),
    ("data.jsonl", '{"instruction": "q", "output": "a"}\n'),
    ("data.json", '[{"instruction": "q", "output": "a"}]'),
])
def test_byte_order_mark(tmp_path, capsys, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert validate.main([str(path)]) == 0
    assert "1 rows in format 'alpaca', all valid" in capsys.readouterr().err


# 4. when no row can be read, the first row's own error, not "unknown format" -----------------------------------------
@pytest.mark.parametrize("name, content, named", [
    ("latin1.jsonl", b'{"instruction": "caf\xe9", "output": "a"}\n', "latin1.jsonl:1: not valid UTF-8 (byte 0xe9"),
    ("pretty.jsonl", b'{\n  "instruction": "q",\n  "output": "a"\n}\n', "pretty.jsonl:1: not valid JSON"),
    ("array.jsonl", b'[{"instruction": "q", "output": "a"}]\n', "array.jsonl:1: a JSON list, not an object"),
    ("empty.jsonl", b"", "empty.jsonl: no rows (empty file)"),
    ("header.csv", b"instruction,output\n", "header.csv: no rows (empty file)"),
])
def test_no_readable_row_names_the_first_rows_error(tmp_path, name, content, named):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        validate.main([str(path)])
    assert str(error.value).startswith(str(tmp_path / named)) and "unknown format" not in str(error.value)


# 6. a JSON array is read whole or not at all ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, named", [
    ('[{"instruction": "q", "output": "a"}]\n[{"instruction": "r", "output": "b"}]', ":2: more content after"),
    ('[{"instruction": "q", "output": "a"}] trailing', ":1: more content after the array's closing ']'"),
    ('[{"instruction": "q", "output": "a"},\n{"instruction": "r", "output": "b"}\n', ":3: the JSON array is not closed"),
    ('[{"instruction": "q", "output": "a"}\n{"instruction": "r", "output": "b"}]', ":2: .* expected ',' or ']'"),
], ids=["two-arrays", "trailing-text", "unclosed", "missing-comma"])
def test_broken_json_array_is_an_error(tmp_path, text, named):
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(UserError, match=f"data.json{named}"):
        validate.main([str(path)])


def test_a_broken_array_element_stops_even_with_on_error_skip(tmp_path):
    rows = [json.dumps(r) for r in ROWS]
    rows[1] = rows[1].replace('", "output"', '" "output"')  # a missing comma inside element 2
    path = tmp_path / "data.json"
    path.write_text("[\n" + ",\n".join(rows) + "\n]")
    with pytest.raises(UserError, match=r"data.json:3: not valid JSON .*the rest of the array cannot be read"):
        build("--sources", path, "--output_dir", tmp_path / "out", "--on_error", "skip")
    assert not (tmp_path / "out").exists()


# 7. CSV cells beyond the csv module's default limit ------------------------------------------------------------------
def test_large_csv_cell(tmp_path, capsys):
    path = tmp_path / "big.csv"
    path.write_text("instruction,output\nq," + "a" * 200_000 + "\n")
    assert validate.main([str(path)]) == 0
    with pytest.raises(UserError, match=r"big.csv:2: not readable as CSV .*max_row_bytes=1,000"):
        validate.main([str(path), "--max_row_bytes", "1000"])


# 8. lone UTF-16 surrogate escapes are row errors, not a crash at the parquet write -----------------------------------
def test_lone_surrogate_is_a_row_error(tmp_path, capsys):
    path = tmp_path / "data.jsonl"
    path.write_text('{"instruction": "q \\ud83d", "output": "a"}\n{"instruction": "ok \\ud83d\\ude00", "output": "a"}\n'
                    + "".join(json.dumps(r) + "\n" for r in ROWS))
    assert validate.main([str(path)]) == 1
    assert capsys.readouterr().out == f"{path}:1: holds a lone UTF-16 surrogate escape (e.g. \\ud83d without its " \
                                      "pair); expected valid Unicode text\n"
    build("--sources", path, "--output_dir", tmp_path / "out", "--on_error", "skip")
    assert json.loads((tmp_path / "out" / "card.json").read_text())["sources"][0]["rows_invalid"] == 1
    array = tmp_path / "data.json"
    array.write_text('[{"instruction": "q", "output": "a"}, {"instruction": "q \\udc00", "output": "a"}]')
    assert validate.main([str(array)]) == 1 and "data.json:1: holds a lone" in capsys.readouterr().out


# 9. folders that are not save_to_disk folders --------------------------------------------------------------------------
def test_llamafactory_data_folder_is_not_a_dataset_folder(tmp_path):
    (tmp_path / "dataset_info.json").write_text(json.dumps({"demo": {"file_name": "demo.jsonl"}}))
    jsonl(tmp_path / "demo.jsonl")
    with pytest.raises(UserError, match="not a `datasets` save_to_disk folder.*dataset_info.json:NAME"):
        validate.main([str(tmp_path)])


def test_a_folder_of_data_files_names_them(tmp_path):
    """A build's own output folder (train.parquet, test.parquet) or a Hub snapshot's (data/*.parquet) is not read as
    one dataset; the error names its files, which can be given one by one (as a source or a decontamination set)."""
    from data_prep.readers import source_kind

    for name in ("train.parquet", "test.parquet", "data/train-00000-of-00001.parquet"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "README.md").write_text("card")
    with pytest.raises(UserError, match=rf"not a `datasets` save_to_disk folder .*; name its data files instead: "
                                        rf"{tmp_path / 'data' / 'train-00000-of-00001.parquet'} "
                                        rf"{tmp_path / 'test.parquet'} {tmp_path / 'train.parquet'}$"):
        source_kind(str(tmp_path))


def test_save_to_disk_folder_missing_its_arrow_file(tmp_path):
    from datasets import Dataset

    Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "disk"))
    for arrow in (tmp_path / "disk").glob("*.arrow"):
        arrow.unlink()
    with pytest.raises(UserError, match="disk: not a readable save_to_disk folder \\(FileNotFoundError"):
        validate.main([str(tmp_path / "disk")])


# 10. malformed dataset_info.json entries ---------------------------------------------------------------------------
@pytest.mark.parametrize("entry, named", [
    ({"columns": ["prompt"]}, "`columns`: ['prompt'] (list)"),
    ({"formatting": "sharegpt", "tags": "role"}, "`tags`: 'role' (str)"),
    ({"file_name": ["demo.jsonl"]}, "`file_name`: ['demo.jsonl'] (list)"),
    ({"columns": {"prompt": ["a"]}}, "`columns.prompt` is ['a']; expected a string"),
], ids=["columns-list", "tags-string", "file_name-list", "column-name-list"])
def test_malformed_registry_entry(tmp_path, entry, named):
    jsonl(tmp_path / "demo.jsonl")
    (tmp_path / "dataset_info.json").write_text(json.dumps({"demo": {"file_name": "demo.jsonl", **entry}}))
    with pytest.raises(UserError) as error:
        validate.main([f"{tmp_path / 'dataset_info.json'}:demo"])
    assert "dataset 'demo'" in str(error.value) and named in str(error.value)


# 11. weights that leave no training row ----------------------------------------------------------------------------
def test_weight_that_leaves_no_training_row(tmp_path):
    source = {"path": str(jsonl(tmp_path / "a.jsonl")), "weight": 0.01}
    with pytest.raises(UserError, match=r"training split is empty .*'a' 0.01 x 4 rows"):
        build("--sources", json.dumps(source), "--output_dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# 12. a NaN score names the field -------------------------------------------------------------------------------------
def test_nan_score_names_the_field(tmp_path, capsys):
    path = tmp_path / "rated.jsonl"
    path.write_text('{"prompt": "q", "completions": [{"response": "a", "overall_score": NaN}, '
                    '{"response": "b", "overall_score": 1}]}\n')
    assert validate.main([str(path)]) == 1
    assert '"completions[0].overall_score" is nan; expected a finite number' in capsys.readouterr().out


# 13. counts that must be positive ----------------------------------------------------------------------------------
@pytest.mark.parametrize("option, value", [("num_perm", 0), ("near_dup_ngram", 0), ("max_row_bytes", -1),
                                           ("decontam_ngram", 0)])
def test_counts_must_be_positive(tmp_path, option, value):
    with pytest.raises(UserError, match=f"{option} must be >= 1, got {value}"):
        build("--sources", jsonl(tmp_path / "a.jsonl"), "--output_dir", tmp_path / "out", f"--{option}", value)


# 5. an unwritable output location or a full disk: before the work, one paragraph -----------------------------------
@pytest.mark.parametrize("code, named", [(errno.EACCES, "cannot write the output folder .*out: Permission denied"),
                                         (errno.ENOSPC, "no space left on .*needed for the data set")])
def test_unwritable_output_location_fails_before_the_work(tmp_path, monkeypatch, code, named):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(card.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(build_module, "import_source", lambda *a: pytest.fail("the job read its sources"))
    with pytest.raises(UserError, match=named):
        build("--sources", jsonl(tmp_path / "a.jsonl"), "--output_dir", tmp_path / "out")


def test_full_disk_while_writing(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[-1]))

    monkeypatch.setattr(card, "plot_lengths", full)
    with pytest.raises(UserError, match="no space left on .*needed for the data set .*out") as error:
        build("--sources", jsonl(tmp_path / "a.jsonl"), "--output_dir", tmp_path / "out")
    assert "checkpoint" not in str(error.value)  # a data job has none to resume from
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # no partial folder left


def test_full_disk_anywhere_in_a_job_is_one_paragraph(capsys, monkeypatch):
    from data_prep import config as config_module

    def job():  # e.g. the work folder in /tmp fills up
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/posttrain-data-x/data-00000.arrow")

    monkeypatch.setattr(config_module, "terminate_on_sigterm", lambda: None)  # signals of the test process stay
    monkeypatch.setattr(config_module.os, "register_at_fork", lambda **hooks: None)
    with pytest.raises(SystemExit) as exit_code:
        config_module.run(job)
    assert exit_code.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no space left on ") and "(writing /tmp/posttrain-data-x/data-00000.arrow)" in err
    assert "needed for the data job's files" in err and "Traceback" not in err


# 14. interruptions clean up and say so in one line ---------------------------------------------------------------------
INTERRUPTED_JOB = """
import os, signal, sys, time
from data_prep import build_sft_set, card, clean
from data_prep.config import run

def stop_while_writing(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)

def stop_from_a_worker(texts, **kwargs):  # in a datasets map worker: the job is stopped while its pool runs
    try:
        os.close(os.open(os.environ["MARKER"], os.O_CREAT | os.O_EXCL))
        os.kill(os.getppid(), signal.SIGTERM)
    except FileExistsError:
        pass
    time.sleep(60)

card.plot_lengths = stop_while_writing
clean._minhash_batch = stop_from_a_worker
run(lambda: build_sft_set.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("where, extra", [("writing", ["--near_dup_threshold", "null"]),
                                          ("worker-pool", ["--num_proc", "2"])])
def test_sigterm_removes_partial_output_and_work_folder(tmp_path, where, extra):
    # a short TMPDIR: the worker pool's manager binds a unix socket there, whose path may not exceed 107 bytes (a
    # pytest-xdist tmp_path can)
    work = Path(tempfile.mkdtemp(prefix="pt-"))
    out = tmp_path / "data" / "out"
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_JOB, "--sources", str(jsonl(tmp_path / "a.jsonl")),
                             "--output_dir", str(out), "--test_size", "0", *extra], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "TMPDIR": str(work), "MARKER": str(tmp_path / "marker")},
                            timeout=50)  # a hung worker pool would hold the job
    left = list(work.iterdir())
    shutil.rmtree(work, ignore_errors=True)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "interrupted" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert list(out.parent.iterdir()) == [] and left == []


def test_several_processes_and_nothing_to_remove(tmp_path):
    """Found while testing the above: a filter that removed no row crashed when the rows were hashed in processes."""
    build("--sources", jsonl(tmp_path / "a.jsonl"), "--output_dir", tmp_path / "out", "--num_proc", "2")
    assert json.loads((tmp_path / "out" / "card.json").read_text())["splits"]["train"]["rows"] == len(ROWS)


class FakeJob:
    """A job process whose first wait is interrupted, as `posttrain data` is by Ctrl-C or SIGTERM."""

    def __init__(self, interruption):
        self.interruption, self.calls = interruption, []

    def wait(self, timeout=None):
        self.calls.append(("wait", timeout))
        if len(self.calls) == 1:
            raise self.interruption
        return 130

    def send_signal(self, signum):
        self.calls.append(("signal", signum))

    def kill(self):
        self.calls.append(("kill", None))


@pytest.mark.parametrize("interruption, forwarded", [(KeyboardInterrupt(), []),
                                                     (Terminated(signal.SIGTERM), [("signal", signal.SIGTERM)])])
def test_an_interrupted_job_gets_time_to_clean_up(interruption, forwarded):
    job = FakeJob(interruption)
    with pytest.raises(KeyboardInterrupt):
        datajobs._wait(job, grace_s=5)
    assert job.calls == [("wait", None), *forwarded, ("wait", 5)]  # never killed


def test_preference_job_checks_its_output_too(tmp_path):
    source = tmp_path / "prefs.jsonl"
    source.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(UserError, match="holds the input"):
        build_preference_set.main(["--sources", str(source), "--output_dir", str(tmp_path), "--overwrite"])


def test_progress_is_drawn_where_rich_draws_it_whatever_stderr_is(monkeypatch):
    """A recipe's data job has a pipe for its stderr (`datajobs.StderrTail`) and the terminal on stdout, where rich
    draws: the progress display still shows there."""
    import io

    import rich
    from rich.console import Console

    monkeypatch.setattr(rich, "_console", Console(file=io.StringIO(), force_terminal=True, width=80))
    assert list(build_module.progress(range(3), "Reading a.jsonl")) == [0, 1, 2]
    assert "Reading a.jsonl" in rich.get_console().file.getvalue()


def test_a_data_job_killed_by_a_signal_says_so_not_its_last_line(monkeypatch, tmp_path):
    job = ("import os, signal, sys; sys.stderr.write('Reading a.jsonl  45%|####5 | 4500/10000\\r'); sys.stderr.flush(); "
           "os.kill(os.getpid(), signal.SIGKILL)")
    monkeypatch.setattr(datajobs, "JOBS", [sys.executable, "-c", job])
    with pytest.raises(UserError, match=r"data job 'build_sft_set' was killed by signal 9 \(SIGKILL") as error:
        datajobs.run_job("build_sft_set", {}, tmp_path / "out")
    assert "Reading" not in str(error.value)


def test_a_data_job_error_is_its_own_whatever_stderr_prints_after_it(monkeypatch, tmp_path):
    """A user error of two lines is the run's error whole; a warning printed as the job exits (here by atexit, as
    multiprocessing's resource tracker does) is not joined to it."""
    job = ("import atexit, sys; from data_prep.config import run; from posttrain.errors import UserError\n"
           "atexit.register(lambda: print('UserWarning: 1 leaked semaphore', file=sys.stderr))\n"
           "def main(): raise UserError('a.jsonl:3: no reply\\nexpected: a reply')\n"
           "run(main)")
    monkeypatch.setattr(datajobs, "JOBS", [sys.executable, "-c", job])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the job's config and error files go
    with pytest.raises(UserError) as error:
        datajobs.run_job("build_sft_set", {}, tmp_path / "out")
    assert str(error.value) == "data job 'build_sft_set' failed with exit code 2: a.jsonl:3: no reply\nexpected: a reply"
    assert not list(tmp_path.glob("*.yaml*")), "its config and error files are removed"


def test_a_data_job_is_read_to_its_end_when_our_stderr_is_gone(monkeypatch, tmp_path):
    """`posttrain run ... 2>&1 | head`: writing the job's stderr on fails, and the job is still read, else it would
    block on a full pipe and the run with it."""
    import threading

    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr(sys, "stderr", os.fdopen(write, "w"))
    monkeypatch.setattr(datajobs, "JOBS", [sys.executable, "-c", "import sys; sys.stderr.write('x' * 1_000_000)"])
    job = threading.Thread(target=datajobs.run_job, args=("build_sft_set", {}, tmp_path / "out"), daemon=True)
    job.start()
    job.join(timeout=30)
    assert not job.is_alive()


def test_a_row_nested_too_deeply_is_a_bad_row(tmp_path):
    """json recurses once per nesting level: one hostile row must not end the job with a RecursionError."""
    path = jsonl(tmp_path / "data.jsonl")
    with path.open("a") as handle:
        handle.write('{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    assert build("--sources", path, "--output_dir", tmp_path / "out", "--on_error", "skip") == 0
    assert "nested too deeply" in (tmp_path / "out" / "rejects.jsonl").read_text()
    array = tmp_path / "data.json"
    array.write_text("[" + '{"instruction": ' + "[" * 100_000 + "]" * 100_000 + "}]")
    with pytest.raises(UserError, match=r"data.json:1: an element nested too deeply"):
        validate.main([str(array)])
