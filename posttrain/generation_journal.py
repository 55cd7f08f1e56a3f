"""Sampling that resumes. `generation.generate` given a `Journal` appends each batch of replies it finishes to a
file, with the random number generators' state after it; a sampler killed part-way (the on-policy pair job: hours at
real sizes) and run again on the same inputs takes those batches back and samples the rest from that state, so it
writes what an uninterrupted run writes (on CPU to the bit; on a GPU as far as its kernels are deterministic).

The file is a sequence of `generate` calls (the pair job makes one per split): each call's line names its inputs
(`identity`: the rendered prompts, their images, the settings and the job's `key`), then one line per finished
batch. A call whose inputs differ from what the file holds at that place, and everything after it, are sampled
again; a line cut short by the kill ends what is read."""

import base64
import hashlib
import json
import os
from pathlib import Path

import torch

from .io import write_text


class Journal:
    """`path`: the journal file, removed by `remove` once what it served has been written. `key`: what the replies
    depend on besides a call's prompts and settings (the model's weights and precision, the seed). `say`: how a
    resume is reported."""

    def __init__(self, path: str | Path, key: dict, say=print):
        self.path, self.key, self.say = Path(path), key, say
        self.lines = _read_lines(self.path)
        self.cursor = 0  # the lines the calls so far have matched

    def start(self, inputs: dict, windows: list[list[int]]) -> list[dict]:
        """The batches of `windows` (row indices, in order) that a call with the same `inputs` finished before, as the
        journal has them (`rows`, `texts`, `stopped`, `lengths`, `rng`); what follows them in the file is dropped
        when this call samples more, since it appends its next batches there."""
        header = {"identity": fingerprint({"key": self.key, **inputs})}
        done = []
        if self.cursor < len(self.lines) and json.loads(self.lines[self.cursor]) == header:
            for line in self.lines[self.cursor + 1:self.cursor + 1 + len(windows)]:
                entry = json.loads(line)
                if entry.get("rows") != windows[len(done)]:
                    break
                done.append(entry)
        else:
            self.lines[self.cursor:] = [json.dumps(header)]
        self.cursor += 1 + len(done)
        if done:
            self.say(f"resuming from {self.path}: {len(done)} of {len(windows)} batches sampled before")
        if len(done) < len(windows):  # the next batches go right after these
            del self.lines[self.cursor:]
            write_text(self.path, "".join(f"{line}\n" for line in self.lines))
        return done

    def record(self, window: list[int], texts: list[str], stopped: list[bool], lengths: list[int]) -> None:
        """Append a finished batch (its rows' replies) and the generators' state after it, flushed to the disk."""
        line = json.dumps({"rows": window, "texts": texts, "stopped": stopped, "lengths": lengths,
                           "rng": rng_state()})
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.lines.append(line)
        self.cursor += 1

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _read_lines(path: Path) -> list[str]:
    """The journal's lines up to the first that does not parse (the one a kill cut short)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        try:
            json.loads(line)
        except json.JSONDecodeError:
            break
        lines.append(line)
    return lines


def fingerprint(value) -> str:
    """sha256 of `value` as JSON, bytes (an embedded image) and decoded images by their own sha256."""
    def spell(item):
        if hasattr(item, "tobytes"):  # a PIL image
            item = item.tobytes()
        return hashlib.sha256(item).hexdigest() if isinstance(item, (bytes, bytearray)) else str(item)

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=spell).encode()).hexdigest()


def rng_state() -> dict:
    """torch's generators' state: the CPU's, and every CUDA device's once CUDA is in use."""
    state = {"cpu": _spell(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_spell(device) for device in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(_tensor(state["cpu"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_tensor(device) for device in state["cuda"]])


def _spell(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
