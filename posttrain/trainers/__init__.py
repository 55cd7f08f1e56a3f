"""Trainers TRL does not ship: UPO (GRPO's policy gradient + a DPO term on preference pairs)."""

from .upo_config import UPOConfig
from .upo_trainer import UPOTrainer

__all__ = ["UPOConfig", "UPOTrainer"]
