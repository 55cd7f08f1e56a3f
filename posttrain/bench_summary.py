"""`posttrain bench`'s table: tokens/s, steps/s, peak memory and MFU per (row, column), the posttrain / TRL ratios within
each repeat and their spread; the Markdown of it; the GPU and its peak TFLOPS."""

import statistics

# Peak dense bf16 matmul throughput for MFU, by GPU name (measured peaks where known, see README)
PEAK_TFLOPS = {"H200": 790.0, "H100": 790.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def summarize(runs: list[dict], n_params: int, peak_tflops: float | None) -> dict:
    """Per row and column: medians over repeats; ratios taken within each repeat, reported as median and range."""
    table = {}
    for row in dict.fromkeys(run["row"] for run in runs):
        mine = [run for run in runs if run["row"] == row]
        reference = "grpo" if row == "upo" else row  # UPO's step is set against plain GRPO's
        base = {run["repeat"]: run for run in runs if run["row"] == reference and run["column"] == "trl"}
        entry = {}
        for column in dict.fromkeys(run["column"] for run in mine):
            chosen = [run for run in mine if run["column"] == column]
            entry[column] = _column_summary(chosen, base, n_params, peak_tflops)
        table[row] = entry
    return table


def _column_summary(runs: list[dict], base: dict, n_params: int, peak_tflops: float | None) -> dict:
    def tokens_per_s(run):
        return run["tokens"] / run["train_runtime_s"]

    summary = {
        "repeats": len(runs),
        "train_runtime_s": statistics.median(run["train_runtime_s"] for run in runs),
        "tokens_per_s": statistics.median(tokens_per_s(run) for run in runs),
        "steps_per_s": statistics.median(run["steps"] / run["train_runtime_s"] for run in runs),
        "peak_memory_gib": max(run["peak_memory_bytes"] for run in runs) / 2**30,
        "memory_kind": runs[0]["memory_kind"],
    }
    if peak_tflops:  # 6·N·tokens: the usual training-FLOPs convention (LoRA's cheaper backward not credited)
        summary["mfu"] = 6 * n_params * summary["tokens_per_s"] / (peak_tflops * 1e12)
    paired = [(run, base[run["repeat"]]) for run in runs if run["repeat"] in base]
    if paired:
        speed = [tokens_per_s(run) / tokens_per_s(ref) for run, ref in paired]
        time_ratio = [run["train_runtime_s"] / ref["train_runtime_s"] for run, ref in paired]
        memory = [run["peak_memory_bytes"] / ref["peak_memory_bytes"] for run, ref in paired]
        cpu = [(ref["train_cpu_s"] / ref["tokens"]) / (run["train_cpu_s"] / run["tokens"]) for run, ref in paired
               if run.get("train_cpu_s") and ref.get("train_cpu_s")]
        summary["vs_trl"] = _spread(speed)
        if cpu:  # tokens per CPU-second, over TRL's: what a busy machine disturbs least
            summary["cpu_vs_trl"] = _spread(cpu)
            summary["cpu_time_vs_trl"] = _spread([run["train_cpu_s"] / ref["train_cpu_s"] for run, ref in paired])
        summary["time_vs_trl"] = _spread(time_ratio)
        summary["memory_vs_trl"] = _spread(memory)
    pairs = [run["upo_pairs"] for run in runs if run.get("upo_pairs") is not None]
    if pairs:  # a UPO step's DPO term runs only on the pairs it has: none, and the row times GRPO alone
        summary["upo_pairs"] = min(pairs)
    return summary


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def markdown_table(table: dict, device: str) -> str:
    """The short table printed and written to bench.md."""
    lines = [f"posttrain bench on {device}. Speed ratio: posttrain tokens/s over plain TRL's in the same repeat "
             "(median, [min–max]); `upo` rows: step time and peak memory over plain GRPO's (lower is better). Per CPU-second: "
             "tokens per CPU-second of `train()`, the ratio a busy machine disturbs least.", "",
             "| stage | column | tokens/s | steps/s | peak memory GiB | MFU | vs TRL | vs TRL, per CPU-second |",
             "|---|---|---|---|---|---|---|---|"]
    for row, columns in table.items():
        for column, s in columns.items():
            mfu = f"{s['mfu']:.1%}" if "mfu" in s else ""
            cpu = "" if column == "trl" else _fmt(s.get("cpu_vs_trl"))
            if row == "upo" and s.get("cpu_time_vs_trl"):
                cpu = f"time {_fmt(s['cpu_time_vs_trl'])}"
            if column == "trl":
                ratio = ""
            elif row == "upo":
                t, m = s.get("time_vs_trl"), s.get("memory_vs_trl")
                ratio = f"time {_fmt(t)}, memory {_fmt(m)}" if t else ""
                if s.get("upo_pairs") == 0:
                    ratio += " (no pairs: DPO term not run)"
            else:
                ratio = _fmt(s.get("vs_trl"))
            lines.append(f"| {row} | {column} | {s['tokens_per_s']:.0f} | {s['steps_per_s']:.3f} | "
                         f"{s['peak_memory_gib']:.2f} | {mfu} | {ratio} | {cpu} |")
    return "\n".join(lines) + "\n"


def _fmt(spread: dict | None) -> str:
    if not spread:
        return ""
    if spread["n"] == 1:
        return f"{spread['median']:.2f}×"
    return f"{spread['median']:.2f}× [{spread['min']:.2f}–{spread['max']:.2f}]"


def device_name() -> tuple[str, float | None]:
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)
        return name, peak
    return "CPU", None
