"""install.sh picks torch's build by the machine: the CPU wheel from PyTorch's CPU index where there is no NVIDIA GPU
(PyPI's Linux wheel is the CUDA build), that index only when it answers, and the installed torch left alone where
`nvidia-smi` exists. Run with a stand-in Python that records the commands it is given."""

import subprocess
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
