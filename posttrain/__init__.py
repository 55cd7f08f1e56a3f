"""posttrain: SFT -> DPO -> UPO post-training with LoRA on the Hugging Face stack."""

import atexit
import functools
import gc
import warnings


def quiet_known_warnings() -> None:
    """Silence the FutureWarnings the pinned stack raises on every stage, about names a user does not choose.

    - PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model, so every stage,
      chat and export would print it.
    - TRL 1.16's configs default `gradient_checkpointing=True`, the alias transformers 5.23 deprecates for
      `activation_checkpointing`, so every stage warned whatever the recipe says (and the stages set it by model size,
      `devices.speed_defaults`); transformers resolves the alias itself.
    """
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing` is deprecated", category=FutureWarning)


quiet_known_warnings()


@functools.cache  # once per process
def skip_final_collection() -> None:
    """For the entry point of a posttrain process (the CLI, a stage, an evaluation, a data job), not for a library
    user's own script: the interpreter's last garbage collection at exit is skipped.

    After torch, transformers and TRL are imported that pass walks millions of objects and took about 2 s of every
    process's exit (8.4 s against 6.2 s for a script that imports the TRL trainers and runs one backward), and a run
    starts a dozen such processes. Only garbage in reference cycles is left for the OS to reclaim; exit handlers
    still run, and this one, registered before the heavy imports, runs after theirs."""
    atexit.register(gc.freeze)  # frozen objects are outside every collection, the final one included
