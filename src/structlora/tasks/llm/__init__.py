"""LLM tasks of the LoRETTA large-model experiments: MeZO-style prompts, candidate scoring, generation.

`structlora train llm` (src/structlora/recipes/llm.py) is the command-line entry point.
"""

from .data import DataUnavailableError, TaskSplits, add_demonstrations, sample_splits
from .metrics import choice_accuracy, exact_match, generation_metrics, normalize_answer, token_f1
from .tasks import TASKS, PromptedExample, TaskSpec, get_task

__all__ = [
    "TASKS", "PromptedExample", "TaskSpec", "get_task", "TaskSplits", "sample_splits", "add_demonstrations",
    "DataUnavailableError", "normalize_answer", "token_f1", "exact_match", "generation_metrics",
    "choice_accuracy",
]
