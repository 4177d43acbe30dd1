"""Short adaptation fine-tuning: data, the training loop, checkpoints and resume, output."""

from .checkpoints import latest_checkpoint
from .data import default_data
from .loop import finetune, lambda_means
from .trainable import select_trainable
from .plan import MemoryPlan, PlanDoesNotFit, memory_plan, plan_for
from .options import CHECKPOINT_DIR_SUFFIX, TRAIN_MODES, FinetuneOptions, FinetuneResult, global_batch_indices, lr_at

__all__ = ["finetune", "default_data", "FinetuneOptions", "FinetuneResult", "global_batch_indices", "lr_at", "latest_checkpoint",
           "lambda_means", "memory_plan", "plan_for", "MemoryPlan", "PlanDoesNotFit", "select_trainable", "TRAIN_MODES", "CHECKPOINT_DIR_SUFFIX"]
