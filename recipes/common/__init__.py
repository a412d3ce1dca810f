"""Shared pieces of the training recipes (``recipes/*.py``): the run skeleton (``loop``), YAML + CLI options, method ->
PEFT config, output directories and results.json, checkpoints, metrics logging, communication between data-parallel
processes.

Recipes differ in data, models, loss and evaluation; everything a user expects to behave the same way across them
lives here, once: a recipe subclasses :class:`Recipe` and runs through :func:`run_recipe`.
"""

from .args import config_to_dict, parse_recipe_args
from .checkpoint import load_checkpoint, resolve_checkpoint, resume_position, save_checkpoint
from .communication import (
    Communication,
    CommunicationArgs,
    check_communication_args,
    communication_results,
    setup_communication,
    trainable_state_sha256,
)
from .loop import LoopSettings, Recipe, TrainLoop, Trainables, format_metrics, naming_option, run_recipe
from .methods import METHODS, apply_method, build_peft_config, check_targets, get_peft_model_checked
from .run import (
    RESULTS_SCHEMA,
    VOLATILE_KEYS,
    StepTimer,
    accelerator_kwargs,
    count_parameters,
    discard_new_output_dir_on_error,
    leave_process_group,
    peak_memory_mb,
    prepare_output_dir,
    reset_peak_memory,
    write_results,
)
from .tracking import MetricsLogger, tensorboard_available

__all__ = [
    "Communication",
    "CommunicationArgs",
    "LoopSettings",
    "METHODS",
    "RESULTS_SCHEMA",
    "VOLATILE_KEYS",
    "MetricsLogger",
    "Recipe",
    "StepTimer",
    "TrainLoop",
    "Trainables",
    "accelerator_kwargs",
    "apply_method",
    "build_peft_config",
    "check_communication_args",
    "check_targets",
    "communication_results",
    "config_to_dict",
    "count_parameters",
    "discard_new_output_dir_on_error",
    "format_metrics",
    "get_peft_model_checked",
    "leave_process_group",
    "load_checkpoint",
    "naming_option",
    "parse_recipe_args",
    "peak_memory_mb",
    "prepare_output_dir",
    "reset_peak_memory",
    "resolve_checkpoint",
    "resume_position",
    "run_recipe",
    "save_checkpoint",
    "setup_communication",
    "tensorboard_available",
    "trainable_state_sha256",
    "write_results",
]
