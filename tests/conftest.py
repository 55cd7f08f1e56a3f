"""Test environment: offline, one thread, a private model cache; fixtures for tiny models built from configs."""

import atexit
import os
import shutil
import tempfile


def _private_folder(variable: str, prefix: str) -> None:
    """A fresh temporary folder in `variable`, unless it is set already (xdist workers and the stage processes the
    tests start inherit the session's); the process that made it removes it when it exits."""
    if variable not in os.environ:
        os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)


# Before anything imports huggingface_hub / torch: offline, one thread (tiny models run ~100x slower on shared cores
# with the default thread pool), and a cache that tests own so nothing leaks into the user's ~/.cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
_private_folder("POSTTRAIN_CACHE", "posttrain-test-cache-")
os.environ.setdefault("WANDB_DISABLED", "true")
# Trackio reads its folder once, on import: every test run logs into a fresh local folder, never ~/.cache or a Space.
if "PYTEST_XDIST_WORKER" not in os.environ:  # the session's own folder, which its xdist workers share
    os.environ.pop("TRACKIO_DIR", None)
_private_folder("TRACKIO_DIR", "posttrain-test-trackio-")
for _remote in ("TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL", "TRACKIO_BUCKET_ID", "TRACKIO_DATASET_ID"):
    os.environ.pop(_remote, None)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_path():
    """Callable: `tiny_model_path("llama")` -> local folder of a tiny random-weight model with the tiny tokenizer."""
    from posttrain.models import resolve_model

    return lambda arch="llama": resolve_model(f"tiny:{arch}")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from posttrain.models import TINY_TOKENIZER, load_tokenizer

    return load_tokenizer(TINY_TOKENIZER)


@pytest.fixture(scope="session")
def task_data(tmp_path_factory):
    """A small verifiable task set (sft / prompts / test splits) built by the real data job."""
    from data_prep.build_verifiable_tasks import main

    out = tmp_path_factory.mktemp("data") / "verifiable"
    assert main(["--output_dir", str(out), "--n_train", "48", "--n_test", "8"]) == 0
    return out


@pytest.fixture(scope="session")
def sft_configs():
    """Callable: (model folder, data folder, output folder, **SFTConfig overrides) -> the SFT stage's three configs."""
    from posttrain.configs import StageArguments

    def make(model_path, data_dir, out_dir, **overrides):
        from trl import ModelConfig, SFTConfig

        stage_args = StageArguments(dataset_name=str(data_dir), dataset_train_split="sft", max_train_samples=32,
                                    tokenizer_name_or_path=str(model_path), eval_dataset=str(data_dir),
                                    eval_limit=4, eval_max_new_tokens=4)
        training = dict(output_dir=str(out_dir), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                        logging_steps=1, save_strategy="no", report_to="none", bf16=False, use_cpu=True,
                        assistant_only_loss=True, max_length=192, seed=0)
        model_args = ModelConfig(model_name_or_path=str(model_path), use_peft=True, lora_r=4, lora_alpha=8,
                                 lora_dropout=0.0, lora_target_modules=["all-linear"])
        return stage_args, SFTConfig(**{**training, **overrides}), model_args

    return make


def _run_cli(*args, cwd, stdin=None, env=None, check=True, timeout=600):
    """`python -m posttrain ARGS` in a subprocess, as a user runs it; fails with its output unless `check=False`.

    The timeout only guards against a hang (pytest-timeout's 600 s is the same): a tiny run takes about a minute on
    two quiet cores, and several times that on cores shared with other jobs."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "posttrain", *map(str, args)], cwd=cwd, input=stdin,
                            capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"posttrain {' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def posttrain_cli():
    """Callable: `posttrain_cli("run", recipe, cwd=...)` runs the real CLI in a subprocess."""
    return _run_cli


@pytest.fixture
def posttrain_here(monkeypatch, capfd):
    """Callable: `posttrain_here("run", recipe, cwd=...)`, as `posttrain_cli` but the CLI's `main` in this process:
    for a command whose own process a test does not need (another run over a copy of a finished run), the same
    code and output (its steps' processes' included) without starting Python, torch and transformers again, about
    5 s of CPU a command. The end-to-end runs stay in a process of their own (`tiny_run`)."""
    import signal
    import subprocess

    from posttrain.cli import main

    def run(*args, cwd, env=None, check=True):
        sigterm = signal.getsignal(signal.SIGTERM)  # `main` makes SIGTERM raise: the test process's comes back
        with monkeypatch.context() as patch:
            patch.chdir(cwd)
            for name, value in {"PYTHONWARNINGS": "ignore", **(env or {})}.items():
                patch.setenv(name, value)
            capfd.readouterr()
            try:
                code = main(list(map(str, args)))
            finally:
                signal.signal(signal.SIGTERM, sigterm)
            out, err = capfd.readouterr()
        if check and code != 0:
            raise AssertionError(f"posttrain {' '.join(map(str, args))} failed:\n{out[-3000:]}\n{err[-3000:]}")
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def _tiny_recipe() -> dict:
    """The tiny recipe (recipes/tiny/text.yaml, SFT -> DPO -> UPO) with SFT trained for 12 steps instead of 3: enough to
    bring the held-out loss below the random base model's (test_promotion stops a blown-up DPO after it)."""
    from pathlib import Path

    import yaml

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "text.yaml").read_text())
    raw["stages"]["sft"]["max_steps"] = 12
    return raw


class SharedRun:
    """A `posttrain run` made once per test session for every xdist worker, in a folder they share: the first worker
    to start starts it in the background (`start`), and a test that needs it waits for it (`wait`). Built on demand
    instead, each worker made its own (a minute of CPU each), and the second one to ask sat idle while the first built.
    """

    def __init__(self, root, raw: dict):
        self.name, self.raw = raw["name"], raw
        self.root = root / self.name
        self.log = self.root / "run.log"  # what `posttrain run` printed, stdout and stderr

    def start(self) -> None:
        import fcntl
        import subprocess
        import sys

        import yaml

        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released on close: one worker starts the run, the others see it
            if (self.root / "started").exists():
                return
            (self.root / "recipe.yaml").write_text(yaml.safe_dump(self.raw, sort_keys=False))
            # `rc` appears when the run has ended, whichever worker waits; the shell is in the workers' process group,
            # so Ctrl-C stops it with them
            command = f"{sys.executable} -m posttrain run recipe.yaml > run.log 2>&1; echo $? > rc.tmp; mv rc.tmp rc"
            subprocess.Popen(["sh", "-c", command], cwd=self.root,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
            (self.root / "started").write_text("")

    def wait(self, timeout: float = 600):
        """The finished run's folder (outputs/<name>); fails the test with the run's output if it failed."""
        import time

        self.start()
        deadline = time.monotonic() + timeout
        while not (self.root / "rc").exists():
            if time.monotonic() > deadline:
                pytest.fail(f"shared run {self.name}: not finished after {timeout} s; see {self.log}")
            time.sleep(0.5)
        if (self.root / "rc").read_text().strip() != "0":
            raise AssertionError(f"shared run {self.name} failed:\n{self.log.read_text()[-4000:]}")
        return self.root / "outputs" / self.name


@pytest.fixture(scope="session")
def shared_tiny(tmp_path_factory) -> SharedRun:
    """The SharedRun behind `tiny_run`. Its folder is under the session's temporary root, which every xdist worker
    shares (a worker's own `tmp_path_factory` folders are private to it)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "shared-runs"
    return SharedRun(root, _tiny_recipe())


@pytest.fixture(scope="session", autouse=True)
def start_shared_tiny(request, shared_tiny):
    """Start the tiny run in the background as a worker begins, when a selected test needs it (every worker collects
    the whole selection), so it builds while the unit tests run."""
    if any("tiny_run" in getattr(item, "fixturenames", ()) for item in request.session.items):
        shared_tiny.start()


@pytest.fixture
def tiny_recipe() -> dict:
    """The recipe of `tiny_run`, a fresh copy to change (a test continuing a copy of that run)."""
    return _tiny_recipe()


@pytest.fixture(scope="session")
def tiny_run(shared_tiny):
    """A finished run of `tiny_recipe` (base, SFT, DPO, UPO), made once per session through the real CLI: tests read
    it and must not modify it (copy it first)."""
    return shared_tiny.wait()


def _check_evaluation(evaluation: dict, n: int) -> None:
    """The numbers of a held-out evaluation (metrics.json's `eval`) agree with what it stored per sample: each
    sample's verdict is the verifier's on its completion, and the accuracy is a count of such verdicts over `n`
    that includes the correct samples."""
    from posttrain.rewards import REWARDS

    samples = evaluation["samples"]
    assert evaluation["n"] == n and samples
    for sample in samples:
        verdict = REWARDS["accuracy"]([sample["completion"]], answer=[sample["answer"]])[0]
        assert bool(verdict) is sample["correct"], sample
    correct = evaluation["accuracy"] * n
    assert correct == pytest.approx(round(correct), abs=1e-9), "accuracy is a count of correct prompts over n"
    right = sum(s["correct"] for s in samples)
    assert round(correct) >= right, "every sample judged correct counts towards the accuracy"
    assert round(correct) - right <= n - len(samples), "the prompts not shown as samples cannot add more"
    if len(samples) == n:
        assert evaluation["accuracy"] == pytest.approx(right / n)


@pytest.fixture(scope="session")
def check_evaluation():
    """Callable: `check_evaluation(metrics["eval"], n)` asserts the evaluation agrees with its own samples."""
    return _check_evaluation


@pytest.fixture
def column_reads(monkeypatch):
    """Counts datasets' `Column` reads of one row (`column[i]`) and passes over it (`for x in column`): each reads
    the Arrow table again (~0.1 ms a row read), so per-row loops over them made builds quadratic."""
    from collections import Counter

    from datasets.arrow_dataset import Column

    reads, getitem, iterate = Counter(), Column.__getitem__, Column.__iter__

    def counted_getitem(self, key):
        reads["row"] += not isinstance(key, slice)
        return getitem(self, key)

    def counted_iter(self):
        reads["pass"] += 1
        return iterate(self)

    monkeypatch.setattr(Column, "__getitem__", counted_getitem)
    monkeypatch.setattr(Column, "__iter__", counted_iter)
    return reads


@pytest.fixture
def upo_prompts_given(monkeypatch):
    """The exception the UPO stage raises, holding its prompts, where it would build UPOTrainer (a stand-in)."""
    import posttrain.trainers

    class Reached(Exception):
        pass

    def reached(*args, train_dataset, **kwargs):
        raise Reached(train_dataset)

    monkeypatch.setattr(posttrain.trainers, "UPOTrainer", reached)
    return Reached
