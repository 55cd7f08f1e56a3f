"""install.sh picks torch's build by the machine: the CPU wheel from PyTorch's CPU index where there is no NVIDIA GPU
(PyPI's Linux wheel is the CUDA build), that index only when it answers, and the installed torch left alone where
`nvidia-smi` exists. Run with a stand-in Python that records the commands it is given."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parent.parent / "install.sh"

STUB = """#!/bin/sh
if [ "$1" = "-c" ]; then [ -n "$STUB_INDEX_UP" ]; exit $?; fi
echo "$*" >> "$STUB_LOG"
"""


@pytest.mark.parametrize("gpu, index_up", [(False, True), (False, False), (True, True)])
def test_install_takes_the_cpu_wheel_where_there_is_no_gpu(tmp_path, gpu, index_up):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(STUB)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHON": str(bin_dir / "python"), "STUB_LOG": str(log),
           "TORCH_CPU_INDEX": "https://cpu.index.example/whl/cpu", **({"STUB_INDEX_UP": "1"} if index_up else {})}
    result = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    install = log.read_text().splitlines()[0]
    assert install.endswith('-e .[dev]' if gpu else '-e .[cpu,dev]'), install
    assert ("--extra-index-url https://cpu.index.example/whl/cpu" in install) == (index_up and not gpu), install
    if not gpu and not index_up:
        assert "does not answer" in result.stdout


def test_the_wheel_carries_what_posttrain_reads_beside_its_code(tmp_path):
    """A non-editable install (`pip install .`, a wheel) has no repository around it: `posttrain run` with no recipe,
    a recipe's `../accelerate/*.yaml`, the chat templates, the tiny tokenizer and data_prep/sources come from the
    wheel. Built without isolation (no network), installed into a folder, read from a folder outside the repository."""
    repo = tmp_path / "repo"  # a copy: setuptools leaves build/ and posttrain.egg-info/ in the folder it builds
    shutil.copytree(INSTALL.parent, repo, ignore=shutil.ignore_patterns(".*", "outputs", "tests", "bench", "build",
                                                                         "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "dist"), str(repo)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    wheel = next((tmp_path / "dist").glob("posttrain-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in ("recipes/text/smollm2-135m.yaml", "recipes/tiny/text.yaml", "recipes/accelerate/single_gpu.yaml",
                 "posttrain/chat_templates/chatml.jinja", "posttrain/assets/tiny_tokenizer/tokenizer.json",
                 "data_prep/sources/chitchat.jsonl"):
        assert name in names, name
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    (tmp_path / "elsewhere").mkdir()
    code = ("import posttrain, posttrain.recipe as r; print(posttrain.__file__, r.load_recipe().name, "
            "r.load_recipe('recipes/text/qwen2.5-1.5b.yaml').accelerate_config)")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "elsewhere", capture_output=True, text=True,
                            env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(site / "posttrain" / "__init__.py"), "smollm2-135m",
                                     str(site / "recipes" / "accelerate" / "ddp.yaml")]


def test_the_sdist_carries_the_tests_and_what_they_read(tmp_path):
    """An sdist is built, unpacked and tested by packagers: setuptools alone takes tests/test*.py but not conftest.py,
    the committed assets, the recipes the tests load or install.sh."""
    import tarfile

    repo = tmp_path / "repo"
    shutil.copytree(INSTALL.parent, repo, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "build",
                                                                         "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; b.build_sdist('dist')"],
                           cwd=repo, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    with tarfile.open(next((repo / "dist").glob("posttrain-*.tar.gz"))) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    for name in ("install.sh", "recipes/tiny/text.yaml", "recipes/accelerate/ddp.yaml", "tests/conftest.py",
                 "tests/distributed_stages.py", "tests/assets/data/messages.jsonl"):
        assert name in names, name
