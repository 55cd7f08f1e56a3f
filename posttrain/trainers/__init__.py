"""Trainers TRL does not ship: UPO (GRPO's policy gradient + a DPO term on preference pairs); TRL's DPOTrainer with
tool results left out of the scored tokens (`dpo_trainer`)."""

from .upo_config import UPOConfig
from .upo_trainer import UPOTrainer

__all__ = ["UPOConfig", "UPOTrainer"]
