"""A stage's `trainer.train()`: resumed where a checkpoint says, stopped at a step's end on SIGTERM with that step
saved, the last step always logged, the loss of the whole stage across a resume, LoRA+, checkpoints marked complete."""

import signal
import sys
import threading
from pathlib import Path

from .. import checkpoints
from ..childproc import SAVED_ON_SIGTERM
from ..errors import Terminated, UserError


def whole_stage_loss(trainer, train_result) -> float:
    """The mean training loss of the whole stage, also after a resume (the Trainer's own `train_loss` covers only the
    steps of the last process): the logged losses up to the resumed checkpoint, weighted by the steps each covers,
    plus the resumed part. Exact when the checkpoint step is a multiple of `logging_steps`."""
    resumed_from = trainer.args.resume_from_checkpoint
    if not resumed_from:
        return train_result.training_loss
    start = int(Path(resumed_from).name.split("-")[-1])
    total, last = 0.0, 0
    for entry in trainer.state.log_history:
        if "loss" in entry and entry.get("step", start + 1) <= start:
            total, last = total + entry["loss"] * (entry["step"] - last), entry["step"]
    resumed = trainer.state.global_step - start
    return (total + train_result.training_loss * resumed) / max(last + resumed, 1)


def train(trainer, training_args, stage_args):
    """`trainer.train()`, resuming where `resume_from_checkpoint` says, with TRL's fused LM head scoring only the
    labelled positions on CPU too, through `models.lm_head` there, LoRA inputs not cast to float32 and back under
    autocast (`models.precision.lora_inputs_uncast`), LoRA updates added inside their matmul in float32 on CPU
    (`models.fused_lora`), and LoRA+ when the stage asks for it."""
    from ..models import fused_lora, lm_head, precision

    if stage_args.loraplus_lr_ratio is not None:
        lora_plus(trainer, stage_args.loraplus_lr_ratio)
    if training_args.resume_from_checkpoint:
        checkpoints.check_processes(training_args.resume_from_checkpoint, trainer.accelerator.num_processes,
                                    training_args.output_dir)
    length_groups_by_epoch(trainer)
    stop = save_and_stop_on_sigterm(trainer)
    trainer.add_callback(stop_when_resumed_at_the_end())
    trainer.add_callback(log_the_last_step())
    try:
        with lm_head.use_on_cpu(), precision.lora_inputs_uncast(trainer.model), fused_lora.update_in_matmul(trainer.model):
            result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    except ResumedAtTheEnd:
        from transformers.trainer_utils import TrainOutput

        result = TrainOutput(trainer.state.global_step, 0.0, {"train_runtime": 0.0, "epoch": trainer.state.epoch})
    finally:
        stop.restore()
    if stop.stopped:  # the checkpoint of the step it stopped at is written: the stage ends here, interrupted
        raise Terminated(signal.SIGTERM)
    return result


def length_groups_by_epoch(trainer) -> None:
    """`train_sampling_strategy: group_by_length` with each epoch's order drawn from the seed and the epoch. The
    Trainer's (transformers 5.23) `LengthGroupedSampler` draws it from torch's global generator when the epoch's batches
    are first asked for, before a resumed run restores the checkpoint's RNG state: resumed inside its second epoch or
    later, a stage drew another order than the uninterrupted run had, so the steps after the checkpoint trained on
    other rows. Seeded before every epoch here (`_run_epoch`), on every process alike. And `batch_rebalance` drawn
    from the run's seed: the Trainer leaves its `BatchRebalanceSampler` at the sampler's own default seed, 42, so runs
    of several seeds (`posttrain ablate --seeds`) all trained on the same order."""
    import torch
    from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

    build, run_epoch, samplers = trainer._get_train_sampler, trainer._run_epoch, []

    def get_train_sampler(*args, **kwargs):
        sampler = build(*args, **kwargs)
        if isinstance(sampler, BatchRebalanceSampler):
            sampler.seed = trainer.args.seed  # its epochs: `seed + epoch`, the Trainer sets the epoch
        if isinstance(sampler, LengthGroupedSampler) and sampler.generator is None:
            sampler.generator = torch.Generator()
            samplers.append(sampler)
        return sampler

    def run_seeded_epoch(*args, **kwargs):
        for sampler in samplers:
            sampler.generator.manual_seed(trainer.args.seed + kwargs["epoch"])
        return run_epoch(*args, **kwargs)

    trainer._get_train_sampler, trainer._run_epoch = get_train_sampler, run_seeded_epoch


def log_the_last_step():
    """Log the last step whatever `logging_steps` is. The Trainer (transformers 5.23) averages the loss over all
    processes only when it logs; the steps after the last log go into its `train_loss` as the main process's own loss
    alone (3 steps, logging_steps 2, two processes: 5.91 instead of the 6.13 one process trains to)."""
    from transformers import TrainerCallback

    class LogTheLastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    return LogTheLastStep()


class ResumedAtTheEnd(Exception):
    """Raised by `stop_when_resumed_at_the_end`'s callback to leave `Trainer.train` before its first step."""


def stop_when_resumed_at_the_end():
    """Resumed from a checkpoint of the last step (the stage stopped while saving or evaluating after training), the
    Trainer (transformers 5.23) still runs one more step before it checks `max_steps`: one step too many, at the
    scheduler's value past its end (a cosine schedule rises again there). At `on_train_begin` the checkpoint's
    weights and state are loaded and nothing has run yet, so the stage leaves `train` there and finishes as is."""
    from transformers import TrainerCallback

    class StopWhenResumedAtTheEnd(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.max_steps > 0 and state.global_step >= state.max_steps:
                raise ResumedAtTheEnd

    return StopWhenResumedAtTheEnd()


SIGTERM_TEST_ENV = "POSTTRAIN_TEST_SIGTERM_AT_STEP"  # test hook: process 0 sends itself SIGTERM after that step


def save_and_stop_on_sigterm(trainer):
    """SIGTERM while a stage trains (a scheduler's preemption or time limit, or the pipeline stopping it): finish the
    current step, save a checkpoint of it, stop, and exit as interrupted, so running the same command again loses at
    most that step instead of everything since the last `save_steps`.

    Several processes must stop after the same step (saving is collective under FSDP and DeepSpeed, and a process
    that trained on would wait forever in the next step's gradient all-reduce), but the signal reaches each at its
    own moment, or only some of them: so after every step they agree, with one all-reduce of a flag (on the
    accelerator's device, the backend the run already uses: a 4-byte collective and one host sync a step, nothing next
    to a step's own gradient all-reduce). Best effort: accelerate's launcher kills a single child 5 s after passing
    SIGTERM on, torch's elastic agent several after 30 s, and a complete checkpoint before that is still there."""
    import contextlib
    import os

    import torch
    from transformers import TrainerCallback

    accelerator = trainer.accelerator

    class SaveAndStop(TrainerCallback):
        def __init__(self):
            self.requested = self.stopped = False
            self.previous = None
            if threading.current_thread() is threading.main_thread():
                self.previous = signal.signal(signal.SIGTERM, self.handle)

        def handle(self, signum, frame):
            self.requested = True
            quiet_if_unread()

        def agreed(self) -> bool:
            """Whether any process was asked to stop: the same answer on every process."""
            if accelerator.num_processes == 1:
                return self.requested
            flag = torch.tensor([int(self.requested)], device=accelerator.device)
            return accelerator.reduce(flag, reduction="sum").item() > 0

        def on_step_end(self, args, state, control, **kwargs):
            if os.environ.get(SIGTERM_TEST_ENV) == str(state.global_step) and accelerator.is_main_process:
                signal.raise_signal(signal.SIGTERM)
            if self.agreed():
                self.stopped = True
                control.should_save = control.should_training_stop = True  # first: the step is saved, come what may
                with contextlib.suppress(OSError):  # its reader gone (`quiet_if_unread`): only the line is lost
                    accelerator.print(f"{SAVED_ON_SIGTERM}{state.global_step} and stopping; run the same command "
                                      "again to resume from it")

        def restore(self):
            if self.previous is not None:
                signal.signal(signal.SIGTERM, self.previous)

    callback = SaveAndStop()
    trainer.add_callback(callback)
    return callback


def quiet_if_unread() -> None:
    """Send this process's output to /dev/null if nothing reads it any more: when `posttrain run` is killed, its death
    is what sent this SIGTERM (`childproc.die_with_parent`), and the first write into its pipe (a progress bar, a log
    line) would fail (EPIPE) and end the stage before it saves. Linux only, as that signal: a pipe without a reader
    polls as POLLERR there."""
    if not sys.platform.startswith("linux"):
        return
    import os
    import select

    for fd in (1, 2):
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, fd)
            os.close(devnull)


def lora_plus(trainer, ratio: float) -> None:
    """Have the trainer build its optimizer with PEFT's `create_loraplus_optimizer`: the LoRA B matrices at `ratio`
    times the learning rate, everything else at it. transformers (5.23) has no LoRA+ option of its own, but it calls
    an optimizer "factory" in `optimizer_cls_and_kwargs` with the model it is about to train (the wrapped one under
    FSDP), so the groups are made from the right parameters at the right time; the optimizer class and its arguments
    stay the ones `optim` names, and the scheduler scales every group alike."""
    from peft import PeftModel
    from peft.optimizers import create_loraplus_optimizer

    if not isinstance(trainer.model, PeftModel):
        raise UserError("loraplus_lr_ratio needs a LoRA adapter (use_peft: true)")
    optimizer_cls, optimizer_kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, trainer.model)
    weight_decay = trainer.args.weight_decay

    class LoraPlus:
        def __call__(self, model, **kwargs):  # kwargs: optimizer_kwargs, as the Trainer hands them back
            return create_loraplus_optimizer(model, optimizer_cls, loraplus_lr_ratio=ratio,
                                             loraplus_weight_decay=weight_decay, **kwargs)

    trainer.optimizer_cls_and_kwargs = (LoraPlus, optimizer_kwargs)


def guard_checkpoints(trainer) -> None:
    """Checkpoints marked complete once written, so a rerun never resumes from a half-written one (`checkpoints`)."""
    from transformers import TrainerCallback

    class CheckpointGuard(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            checkpoints.after_save(args.output_dir, state.global_step, state.is_world_process_zero)

    trainer.add_callback(CheckpointGuard())
