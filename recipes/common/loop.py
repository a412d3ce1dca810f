"""The run skeleton of the training recipes: one accelerate training loop that every recipe plugs into.

A recipe subclasses :class:`Recipe` and supplies what differs between recipes: its data and models
(:meth:`Recipe.load`, :meth:`Recipe.build`), the learning-rate schedule, the loss of a micro-batch, what an
evaluation does (GLUE metrics, DreamBooth validation images), what it saves, and its own results keys. Its options map
onto one :class:`LoopSettings`. :func:`run_recipe` then owns everything a user expects to behave the same way in every
recipe, in this order:

1. the ``Accelerator`` (``common.run.accelerator_kwargs``), logging (INFO on the main process, ERROR on the others, each
   library's messages printed once) and the torch thread count;
2. :meth:`Recipe.load`, before anything is written, then the output directory (``prepare_output_dir``);
3. set-up, which removes a directory it created when it fails: :meth:`Recipe.build`, ``accelerator.prepare``, the
   scheduler, communication between processes (``setup_communication``) and the resume from a checkpoint;
4. the loop in the style of accelerate's examples: ``accumulate``, ``backward``, gradient clipping, optimizer and
   scheduler steps, with the data order of every epoch seeded and a resumed run skipping the batches already seen;
   logging every ``logging_steps``, evaluation (after averaging the replicas of a local-steps run) and checkpoints at
   their intervals, ``--stop_after_steps`` as a checkpoint and a stop;
5. the end: one model on every process (``synchronize``), per-process state hashes, :meth:`Recipe.save`,
   ``results.json`` with the common keys of ``RESULTS_SCHEMA``, a summary on stdout.

A configuration or data error anywhere in a run (``ValueError``, and ``OSError`` for files and downloads) ends it with
one line, ``<recipe>: error: <message>``, and exit status 1.

Divergence ends a run the same way (:class:`TrainingDiverged`), and nothing is saved from a diverged state. Every
micro-batch's loss is checked on the device, without a sync: the first optimizer step whose loss was NaN or infinite
is kept in a device tensor. At every logging, evaluation and checkpoint step and before the end, one small gather over
the processes reads it together with whether every trained parameter is finite (non-finite gradients show there: the
optimizer step turns them into NaN parameters). So a NaN costs at most ``logging_steps`` wasted steps, the error names
the step where the loss first went wrong, and no checkpoint, ``best/`` adapter, final save or ``results.json`` comes
from a diverged state. An evaluation metric that is NaN or infinite stops the run too, before anything is saved with
it. A resumed checkpoint whose trained parameters or optimizer state are not finite is refused. With fp16, steps whose
gradients overflow are still skipped by accelerate's gradient scaler (that is its normal working, not divergence).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
from torch import nn
from torch.utils.data import DataLoader

from gsoft.distributed import collective_failure
from gsoft.distributed.volunteer import AveragingFailed, VolunteerConfig

from .args import config_to_dict
from .checkpoint import (
    load_checkpoint,
    newest_intact_checkpoint,
    resolve_checkpoint,
    resume_position,
    save_checkpoint,
)
from .communication import (
    Communication,
    CommunicationArgs,
    communication_results,
    setup_communication,
    trainable_state_sha256,
)
from .run import (
    RESTART_COUNT,
    StepTimer,
    accelerator_kwargs,
    all_finite,
    count_parameters,
    discard_new_output_dir_on_error,
    format_nonfinite,
    leave_process_group,
    nonfinite_names,
    nonfinite_numbers,
    peak_memory_mb,
    prepare_output_dir,
    write_results,
)
from .tracking import MetricsLogger, tensorboard_available

#: The errors a run reports as one line: bad options or data (``ValueError``), missing files and failed downloads
#: (``OSError``; transformers and diffusers raise it for a model they cannot fetch).
RECIPE_ERRORS = (ValueError, OSError)


class TrainingDiverged(RuntimeError):
    """The loss, the trained parameters or an evaluation metric became NaN or infinite; the run stops with this as its
    one error line, before anything is saved from that state."""


@dataclass
class LoopOptions:
    """The run options that mean the same in every recipe on :func:`run_recipe` (YAML keys and ``--key value``
    flags): checkpoints, resuming, evaluation and logging intervals, data workers, threads. A recipe's options class
    lists them after its own (``class Args(CommunicationArgs, LoopOptions, _RecipeOptions)``); :meth:`loop_settings`
    maps them onto :class:`LoopSettings`."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace an output directory that holds another run."},
    )
    resume_from_checkpoint: Optional[str] = field(
        default=None,
        metadata={"help": "'latest' or a checkpoint directory; continues with identical results."},
    )
    eval_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Evaluate every N optimizer steps; null = every epoch. Always at the end.", "min": 1},
    )
    save_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Checkpoint every N steps; null = at every evaluation.", "min": 1},
    )
    checkpoints_total_limit: Optional[int] = field(
        default=2,
        metadata={"help": "Keep only the newest N checkpoints; null = all.", "min": 1},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log loss, learning rate and throughput every N steps.",
                                                     "min": 1})
    report_to: str = field(
        default="tensorboard",
        metadata={"help": "tensorboard (when installed; metrics.jsonl is always written) or none.",
                  "choices": ("tensorboard", "none")},
    )
    progress_bar: bool = field(default=True, metadata={"help": "tqdm progress bar on the main process."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes.", "min": 0})
    torch_num_threads: Optional[int] = field(
        default=None,
        metadata={"help": "CPU threads of torch per process; null = torch's default. Tiny models run fastest with 1.",
                  "min": 1},
    )
    stop_after_steps: Optional[int] = field(
        default=None,
        metadata={"help": "Debugging: checkpoint and exit after N steps, as if interrupted (no results.json).",
                  "min": 1},
    )

    def loop_settings(self, **settings: Any) -> "LoopSettings":
        """These options, with the run options every recipe on :func:`run_recipe` declares itself (``output_dir``,
        ``seed``, ``max_steps``, ``num_train_epochs``, ``gradient_accumulation_steps``, ``mixed_precision``,
        ``max_grad_norm``, ``task``, ``method``; the recipe's options are its communication options too), as the
        loop's settings; ``settings`` adds or replaces some (``volunteer=...``)."""
        opts: Any = self
        base = dict(
            output_dir=opts.output_dir, run_config=config_to_dict(opts), seed=opts.seed, max_steps=opts.max_steps,
            num_epochs=opts.num_train_epochs, gradient_accumulation_steps=opts.gradient_accumulation_steps,
            mixed_precision=opts.mixed_precision, max_grad_norm=opts.max_grad_norm, scheduler_per_micro_batch=False,
            eval_steps=self.eval_steps, save_steps=self.save_steps,
            checkpoints_total_limit=self.checkpoints_total_limit, logging_steps=self.logging_steps, stop_after_steps=self.stop_after_steps,
            resume_from_checkpoint=self.resume_from_checkpoint, overwrite_output_dir=self.overwrite_output_dir,
            tensorboard=self.report_to == "tensorboard", logging_dir="tensorboard", progress_bar=self.progress_bar,
            progress_desc=f"{opts.task}/{opts.method}", torch_num_threads=self.torch_num_threads,
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True), communication=opts,
        )
        return LoopSettings(**{**base, **settings})


@dataclass
class LoopSettings:
    """How the loop runs a recipe. Each recipe fills it from its own options, whose names it keeps, and checks
    those options itself."""

    output_dir: str
    """Where run_config.json, metrics.jsonl, checkpoints/, results.json and the recipe's outputs go."""
    run_config: dict[str, Any]
    """Every option of the run, written to run_config.json and compared when a directory is reused."""
    seed: int
    """Seeds every RNG at the start (accelerate's ``set_seed``) and the compressed communication's shared draws."""
    max_steps: Optional[int] = None
    """Optimizer steps to take; None: ``num_epochs`` x optimizer steps per epoch."""
    num_epochs: float = 1.0
    """Epochs when ``max_steps`` is None (a fraction ends inside an epoch)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (accelerate's ``accumulate``)."""
    mixed_precision: Optional[str] = None
    """no, fp16 or bf16; None: accelerate's configuration."""
    max_grad_norm: Optional[float] = None
    """Clip the gradients of the trained parameters to this norm at every optimizer step; None: no clipping."""
    scheduler_per_micro_batch: bool = False
    """False: the learning-rate scheduler steps once per optimizer step (transformers' scripts; build it for
    ``max_steps`` steps). True: it steps after every micro-batch inside ``accumulate`` and accelerate counts only the
    optimizer steps, once per process (diffusers' scripts; build it for ``max_steps`` x processes steps)."""
    eval_steps: Optional[int] = None
    """Evaluate every N optimizer steps; None: at the end of every epoch; 0: only at the end. Always at the end."""
    save_steps: Optional[int] = None
    """Checkpoint every N optimizer steps; None: at the evaluation interval (not the final evaluation); 0: never
    (``stop_after_steps`` still checkpoints)."""
    checkpoints_total_limit: Optional[int] = None
    """Keep only the newest N checkpoints; None: all."""
    logging_steps: int = 10
    """Write loss, learning rate, throughput and bytes sent to metrics.jsonl every N steps (and at the last one)."""
    stop_after_steps: Optional[int] = None
    """Checkpoint and stop after N steps, as if interrupted (no results.json; resume with ``latest``)."""
    resume_from_checkpoint: Optional[str] = None
    """'latest' or a checkpoint directory (``common.checkpoint.resolve_checkpoint``)."""
    overwrite_output_dir: bool = False
    """Replace an output directory that holds another run (``common.run.prepare_output_dir``)."""
    tensorboard: bool = True
    """Also log to tensorboard, when it is installed."""
    logging_dir: str = "tensorboard"
    """Tensorboard's directory under ``output_dir``."""
    progress_bar: bool = True
    """A tqdm bar of the optimizer steps on the main process."""
    progress_desc: str = "steps"
    """The bar's label."""
    torch_num_threads: Optional[int] = None
    """CPU threads of torch in every process; None: torch's default."""
    dataloader_config: DataLoaderConfiguration = field(default_factory=DataLoaderConfiguration)
    """How accelerate prepares the data loaders (e.g. ``use_seedable_sampler=True``)."""
    communication: CommunicationArgs = field(default_factory=CommunicationArgs)
    """What several processes exchange (the recipe's own options object, which inherits ``CommunicationArgs``)."""
    volunteer: Optional[VolunteerConfig] = None
    """None: the processes of accelerate's launch; a config: this process is one peer of a hivemind swarm
    (``common.volunteer.VolunteerLoop`` runs it)."""


@dataclass
class Trainables:
    """What :meth:`Recipe.build` hands to the loop, before ``accelerator.prepare``."""

    models: dict[str, nn.Module]
    """The trained models by name, e.g. ``{"unet": ..., "text_encoder": ...}``: prepared, accumulated, communicated,
    checkpointed and hashed in this order. After preparation :attr:`TrainLoop.models` holds the prepared ones."""
    optimizer: torch.optim.Optimizer
    """One optimizer over the trained parameters of every model."""
    train_loader: DataLoader
    """The training batches; their order is seeded per epoch (``set_epoch``) so a resumed run sees the same data."""


class Recipe(abc.ABC):
    """What a training recipe supplies to :class:`TrainLoop`; the loop passes itself (``run``) to every hook, so a
    hook reads ``run.accelerator``, ``run.models``, ``run.output_dir``, ``run.step`` or ``run.state``."""

    #: The recipe's name: the prefix of its error lines, its logger and its tracker project.
    name: str = "recipe"

    def load(self, run: "TrainLoop") -> None:
        """Read and check the inputs (data, models, adapters) before the output directory is claimed, so that a bad
        option leaves no directory behind and never replaces an earlier run. Nothing is written under
        ``run.output_dir`` here. Optional."""

    @abc.abstractmethod
    def build(self, run: "TrainLoop") -> Trainables:
        """The trained models, their optimizer and the training data (unprepared). The output directory exists; a
        failure here removes it again when this run created it. Set the initial ``run.state`` here."""

    def on_prepared(self, run: "TrainLoop") -> None:
        """After ``accelerator.prepare`` and before a resume: prepare evaluation data, point the recipe's own
        references at ``run.models`` (the prepared models). Optional."""

    @abc.abstractmethod
    def scheduler(self, run: "TrainLoop", optimizer: torch.optim.Optimizer,
                  max_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
        """The learning-rate schedule of ``optimizer`` for ``max_steps`` optimizer steps (see
        :attr:`LoopSettings.scheduler_per_micro_batch` for how often it steps)."""

    @abc.abstractmethod
    def loss(self, run: "TrainLoop", batch: Any, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch and extra scalars to log with it. ``micro_step`` counts micro-batches from the
        start of the run in this process (resumed ones included): seed per-batch randomness with it."""

    @abc.abstractmethod
    def evaluate(self, run: "TrainLoop", step: int, final: bool) -> Optional[dict[str, float]]:
        """Evaluate at optimizer step ``step`` (``final``: the last one); called on every process, with the replicas
        of a local-steps run averaged. Metrics returned are logged as ``eval_<name>``."""

    @abc.abstractmethod
    def save(self, run: "TrainLoop") -> None:
        """Save what the run trained (adapters, a model) under ``run.output_dir``; on the main process, at the end."""

    @abc.abstractmethod
    def results(self, run: "TrainLoop") -> dict[str, Any]:
        """The recipe's results.json keys (``method`` among them), added to the common ones."""

    @abc.abstractmethod
    def summary(self, run: "TrainLoop", results: dict[str, Any]) -> str:
        """The end-of-run line printed by the main process (results, where the outputs are)."""

    def divergence_advice(self, run: "TrainLoop") -> str:
        """What to change when the run diverges, for its error line. The default names the options every recipe has;
        a recipe may add its own (a more stable parametrisation, say)."""
        advice = "lower --learning_rate"
        if any(getattr(config, "orthogonal_map", None) == "cayley_neumann"
               for model in run.models.values()
               for config in getattr(run.accelerator.unwrap_model(model), "peft_config", {}).values()):
            advice += " or use the exact Cayley map (orthogonal_map: cayley in method_options)"
        if run.settings.max_grad_norm is None:
            advice += " or clip the gradients with --max_grad_norm"
        if run.accelerator.mixed_precision == "fp16":
            advice += ", or train in bf16 or fp32 (--mixed_precision) instead of fp16"
        return advice


class TrainLoop:
    """One run of a :class:`Recipe` with :class:`LoopSettings`; :meth:`run` trains and returns the results."""

    def __init__(self, recipe: Recipe, settings: LoopSettings) -> None:
        self.recipe = recipe
        self.settings = settings
        self.output_dir = Path(settings.output_dir)
        self.logger = logging.getLogger(recipe.name)
        self.accelerator: Accelerator
        self.models: dict[str, nn.Module] = {}
        self.optimizer: Any = None
        self.scheduler: Any = None
        self.train_loader: Any = None
        self.comm: Optional[Communication] = None
        #: The recipe's trainer state (e.g. the best evaluation so far): saved in every checkpoint, restored on resume.
        self.state: dict[str, Any] = {}
        self.step = 0
        self.max_steps = 0
        self.steps_per_epoch = 0
        self.trainable_params = 0
        self.total_params = 0
        self._start_epoch = 0
        self._skip_batches = 0
        self._last_loss: Optional[torch.Tensor] = None
        self._trained: list[tuple[str, nn.Parameter]] = []
        self._losses = _LossWatch()
        self._checked_step = 0

    # ---- the parts of a run ------------------------------------------------------------------------------------------
    def run(self) -> Optional[dict[str, Any]]:
        """Train; the results (also written to results.json), or None when stopped by ``stop_after_steps``."""
        s = self.settings
        self.accelerator = Accelerator(**accelerator_kwargs(  # several CPU processes become one gloo job
            gradient_accumulation_steps=s.gradient_accumulation_steps,
            mixed_precision=s.mixed_precision,
            log_with="tensorboard" if self._tensorboard else None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir),
                                                logging_dir=str(self.output_dir / s.logging_dir)),
            step_scheduler_with_optimizer=s.scheduler_per_micro_batch,
            dataloader_config=s.dataloader_config,
        ))
        configure_logging(self.accelerator.is_main_process)
        self._log_elastic_restart()
        set_seed(s.seed)  # every RNG, as diffusers' and transformers' scripts do; recipes may re-seed their own draws
        if s.torch_num_threads:
            torch.set_num_threads(s.torch_num_threads)
        self.recipe.load(self)
        fresh = not (self.output_dir.is_dir() and any(self.output_dir.iterdir()))
        prepare_output_dir(self.output_dir, s.run_config, overwrite=s.overwrite_output_dir,
                           resume=bool(s.resume_from_checkpoint), is_main_process=self.accelerator.is_main_process,
                           barrier=self.accelerator.wait_for_everyone)
        self.accelerator.wait_for_everyone()
        with discard_new_output_dir_on_error(self.output_dir, fresh, self.accelerator.is_main_process):
            self._set_up()
        return self._train()

    def _log_elastic_restart(self) -> None:
        """Under torch's elastic agent, say which restart this is and where it continues from."""
        restart = os.environ.get(RESTART_COUNT)
        if not restart or restart == "0":
            return
        limit = os.environ.get("TORCHELASTIC_MAX_RESTARTS", "?")
        if self.settings.resume_from_checkpoint:
            self.logger.info("torch elastic restart %s of at most %s: resuming from --resume_from_checkpoint %s",
                             restart, limit, self.settings.resume_from_checkpoint)
        else:
            self.logger.warning("torch elastic restart %s of at most %s without --resume_from_checkpoint: training "
                                "starts again from step 0 (pass --resume_from_checkpoint latest to continue from the "
                                "newest checkpoint)", restart, limit)

    @property
    def _tensorboard(self) -> bool:
        return self.settings.tensorboard and tensorboard_available()

    def _set_up(self) -> None:
        """Build, prepare, communicate, resume."""
        s, acc = self.settings, self.accelerator
        self._prepare(self.recipe.build(self))
        self.recipe.on_prepared(self)
        counts = [count_parameters(acc.unwrap_model(m)) for m in self.models.values()]
        self._trained = [(f"{model_name}.{name}" if len(self.models) > 1 else name, p)
                         for model_name, model in self.models.items()
                         for name, p in acc.unwrap_model(model).named_parameters() if p.requires_grad]
        self.trainable_params, self.total_params = sum(c[0] for c in counts), sum(c[1] for c in counts)
        self.logger.info("%s trainable of %s parameters; %d optimizer steps (%d per epoch)",
                         f"{self.trainable_params:,}", f"{self.total_params:,}", self.max_steps, self.steps_per_epoch)
        # error-feedback buffers, local-step references, each process's optimizer state (with --compress updates) and
        # byte counters resume too; loaded after accelerate's own (main process) optimizer state, so theirs win
        if self.comm is not None:
            self.comm.register_for_checkpointing(acc)
        # verified (sizes and hashes) once, on the main process, which also logs why it skips a broken checkpoint
        checkpoint = self._on_main_process(lambda: resolve_checkpoint(self.output_dir, s.resume_from_checkpoint))
        if checkpoint is not None:
            state = load_checkpoint(acc, checkpoint)
            self._refuse_non_finite_state(checkpoint)
            self.step = int(state.pop("step"))
            state.pop("epoch", None)
            self.state.update(state)
            self._start_epoch, self._skip_batches = self._resume_position()
            self._checked_step = self.step
            self.logger.info("resumed from %s at step %d (epoch %d, skipping %d batches)", checkpoint, self.step,
                             self._start_epoch, self._skip_batches)

    def _prepare(self, trainables: Trainables) -> None:
        """accelerate's preparation of the models, optimizer, data and scheduler, the run's length, and the
        communication between processes."""
        s, acc = self.settings, self.accelerator
        names = list(trainables.models)
        prepared = acc.prepare(*trainables.models.values(), trainables.optimizer, trainables.train_loader)
        self.models = dict(zip(names, prepared[: len(names)]))
        self.optimizer, self.train_loader = prepared[len(names):]
        self.steps_per_epoch = math.ceil(len(self.train_loader) / s.gradient_accumulation_steps)
        self.max_steps = s.max_steps or math.ceil(s.num_epochs * self.steps_per_epoch)
        self.scheduler = acc.prepare(self.recipe.scheduler(self, self.optimizer, self.max_steps))
        # Several processes: every trained model exchanges its gradients (or, with --compress updates, its parameter
        # deltas) through gsoft.distributed; the models share the optimizer.
        self.comm = setup_communication(s.communication, acc, self.models, self.optimizer, seed=s.seed)

    def _resume_position(self) -> tuple[int, int]:
        """The data epoch a resumed run continues in and the batches of it already trained on."""
        return resume_position(self.step, len(self.train_loader), self.settings.gradient_accumulation_steps)

    def _refuse_non_finite_state(self, checkpoint: Path) -> None:
        """A checkpoint saved after its run diverged (its trained parameters or optimizer state hold NaN or inf) is
        not resumed (collective: every process checks what it loaded)."""
        names = {id(p): name for name, p in self._trained}
        optimizer_state = ((f"optimizer state of {names.get(id(param), '<unnamed>')!r} ({key})", value)
                           for param, state in self.optimizer.state.items() if isinstance(state, Mapping)
                           for key, value in state.items() if isinstance(value, torch.Tensor))
        found = [repr(name) for name in nonfinite_names(self._trained)] + nonfinite_names(optimizer_state)
        everywhere = [name for names_of_process in gather_object([found]) for name in names_of_process]
        if not everywhere:
            return
        if not self.accelerator.is_main_process:
            raise _MainProcessFailed()
        raise ValueError(
            f"checkpoint {checkpoint} holds non-finite values ({', '.join(dict.fromkeys(everywhere))}): its run had "
            "diverged, so it is not resumed. Resume from an earlier checkpoint (--resume_from_checkpoint "
            "<checkpoint dir>), or start again with --overwrite_output_dir and a lower --learning_rate."
        )

    def _train(self) -> Optional[dict[str, Any]]:
        """The loop, then the end of the run; None when stopped early."""
        from tqdm.auto import tqdm

        s, acc = self.settings, self.accelerator
        models = list(self.models.values())
        self._metrics = MetricsLogger(acc, self.output_dir, self.recipe.name, s.run_config,
                                      tensorboard=self._tensorboard)
        self._progress = tqdm(total=self.max_steps, initial=self.step, desc=s.progress_desc,
                              disable=not (acc.is_main_process and s.progress_bar))
        self._window = _Window(acc.num_processes)
        self._evaluated_final = False
        timer = StepTimer(acc.device)
        micro_step = self._start_epoch * len(self.train_loader) + self._skip_batches  # the next one, from step 0
        for model in models:
            model.train()
        start = time.perf_counter()
        for epoch in self._data_epochs():
            if self.step >= self.max_steps:
                break
            for batch in self._batches(epoch):
                if not timer.running:
                    timer.start()
                stats = self._micro_batch(models, batch, micro_step)
                micro_step += 1
                if not acc.sync_gradients:
                    continue
                advanced = self._advance()
                if not advanced:
                    continue
                timer.stop()
                self.step += advanced
                self._progress.update(advanced)
                if self._after_step(epoch, stats) == "stop":
                    self._close()
                    return None
                if self.step >= self.max_steps:
                    break
        runtime = time.perf_counter() - start
        self._progress.close()
        self._synchronize()  # normally a no-op: the last step was an evaluation
        if not self._evaluated_final:  # resumed from the final checkpoint: nothing left to train
            self._evaluate(final=True)
        results = self._finish(runtime, timer)
        self._close()
        acc.wait_for_everyone()
        return results

    def _data_epochs(self) -> Iterable[int]:
        """The passes over the training data the run takes (the loop stops early at ``max_steps``)."""
        return range(self._start_epoch, math.ceil(self.max_steps / self.steps_per_epoch))

    def _advance(self) -> int:
        """Optimizer steps completed by the micro-batch that ended an accumulation: one, with the scheduler's step
        (unless it steps per micro-batch)."""
        if not self.settings.scheduler_per_micro_batch:
            self.scheduler.step()
        return 1

    def _batches(self, epoch: int) -> Any:
        """The epoch's batches: its data order (and a dataset's own per-epoch randomness) set by ``set_epoch``, and
        in the epoch a resumed run starts in, without the batches it already trained on (the skipping loader
        inherits the epoch)."""
        self.train_loader.set_epoch(epoch)
        if epoch == self._start_epoch and self._skip_batches:
            return self.accelerator.skip_first_batches(self.train_loader, self._skip_batches)
        return self.train_loader

    def _micro_batch(self, models: list[nn.Module], batch: Any, micro_step: int) -> dict[str, float]:
        """Forward and backward of one micro-batch; at the end of an accumulation, clipping and the optimizer step
        (accelerate's ``accumulate`` makes the optimizer and the scheduler skip the other micro-batches)."""
        s, acc = self.settings, self.accelerator
        with acc.accumulate(*models):
            loss, stats = self.recipe.loss(self, batch, micro_step)
            acc.backward(loss)
            if acc.sync_gradients and s.max_grad_norm is not None:
                acc.clip_grad_norm_([p for m in models for p in m.parameters() if p.requires_grad], s.max_grad_norm)
            self.optimizer.step()
            if s.scheduler_per_micro_batch:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self._last_loss = loss.detach()
        self._window.add(self._last_loss, batch)
        self._losses.add(self._last_loss, self.step + 1)
        return stats

    def _after_step(self, epoch: int, stats: dict[str, float]) -> Optional[str]:
        """Logging, evaluation and checkpoint of optimizer step ``self.step``; ``"stop"`` after ``stop_after_steps``."""
        s = self.settings
        stopping = s.stop_after_steps is not None and s.stop_after_steps <= self.step < self.max_steps
        logging_now = self.step % s.logging_steps == 0 or self.step == self.max_steps or stopping
        evaluating = self.step == self.max_steps or self._every(self.step, self._eval_interval)
        saving = self._every(self.step, self._save_interval) or stopping
        if logging_now:
            record = {**self._window.flush(self.accelerator), "lr": self.scheduler.get_last_lr()[0],
                      "epoch": self.step / self.steps_per_epoch, **stats,
                      "comm_bytes_sent": self._bytes_sent()}
            self._metrics.log(record, self.step)  # a diverged window's NaN loss is logged, then the run stops
            self._progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
        if logging_now or evaluating or saving:
            self._guard()
        if evaluating:
            self._evaluate(final=self.step == self.max_steps)
        if saving:
            save_checkpoint(self.accelerator, self.output_dir, self.step, {"epoch": epoch, **self.state},
                            total_limit=s.checkpoints_total_limit)
        if stopping:
            self.logger.info("--stop_after_steps %d: checkpointed at step %d of %d and stopping (resume with "
                             "--resume_from_checkpoint latest)", s.stop_after_steps, self.step, self.max_steps)
            return "stop"
        return None

    def _close(self) -> None:
        self._progress.close()
        self._metrics.close()

    def _finish(self, runtime: float, timer: StepTimer) -> dict[str, Any]:
        """State hashes, the recipe's save, results.json and the summary."""
        acc = self.accelerator
        self._guard()
        hashes = gather_object([trainable_state_sha256(*(acc.unwrap_model(m) for m in self.models.values()))])
        if acc.is_main_process:
            self.recipe.save(self)
        results = {
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "train_steps": self.step,
            "train_runtime_s": round(runtime, 3),
            "step_time_s_median": timer.median_s,
            "peak_memory_mb": round(peak_memory_mb(acc.device), 1),
            "world_size": acc.num_processes,
            "rank_state_sha256": list(hashes),
            "mixed_precision": acc.mixed_precision,
            "device": str(acc.device),
            **self._communication_results(),
            **self.recipe.results(self),
        }
        if acc.is_main_process:
            write_results(self.output_dir, results)
            print(self.recipe.summary(self, results), flush=True)
            line = self._communication_line()
            if line:
                print(line, flush=True)
        return results

    def _bytes_sent(self) -> int:
        return self.comm.bytes_sent if self.comm is not None else 0

    def _communication_results(self) -> dict[str, Any]:
        """results.json's communication fields."""
        return communication_results(self.comm)

    def _communication_line(self) -> Optional[str]:
        """The end-of-run line about communication (none for one process)."""
        if self.comm is None:
            return None
        return (f"communication ({self.settings.communication.grad_compression}): {self.comm.bytes_sent:,} bytes "
                f"sent by this process, {self.comm.bytes_uncompressed:,} for fp32 all-reduces of the same steps")

    # ---- helpers -----------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """accelerate's ``main_process_first`` (the main process runs the block, then the others: downloads, caches
        and generated files happen once), except that a block failing on the main process stops the others too,
        quietly, instead of leaving them at a barrier: the main process's error is the run's one error line.

        Use it for the loading and checking in :meth:`Recipe.load` and :meth:`Recipe.build` (no collectives inside:
        the processes run the block one after the other)."""
        acc = self.accelerator
        if acc.num_processes == 1:
            yield
            return
        if not acc.is_main_process:
            if not _main_process_succeeded(None):
                raise _MainProcessFailed()
            yield
            return
        try:
            yield
        except BaseException:
            _main_process_succeeded(False)
            raise
        _main_process_succeeded(True)

    @property
    def last_loss(self) -> Optional[float]:
        """The loss of the last micro-batch trained in this process (None before any)."""
        return None if self._last_loss is None else float(self._last_loss)

    @property
    def _eval_interval(self) -> int:
        every = self.settings.eval_steps
        return self.steps_per_epoch if every is None else every

    @property
    def _save_interval(self) -> int:
        every = self.settings.save_steps
        return self._eval_interval if every is None else every

    @staticmethod
    def _every(step: int, interval: int) -> bool:
        return interval > 0 and step % interval == 0

    def _synchronize(self) -> None:
        """Local steps: average the replicas now, so that evaluation and saving see one model (collective)."""
        if self.comm is not None:
            self.comm.synchronize()

    def _evaluate(self, final: bool) -> None:
        self._synchronize()  # evaluation points are synchronisation points with --local_steps
        scores = self.recipe.evaluate(self, self.step, final)
        self._evaluated_final = final
        if scores:
            self._metrics.log({f"eval_{k}": v for k, v in scores.items()}, self.step)
            self.logger.info("step %d: %s", self.step, format_metrics(scores))
        bad = [item for found in gather_object([nonfinite_numbers(scores or {})]) for item in found]
        if bad:
            self._stop_diverged(
                f"the evaluation at step {self.step} gave {', '.join(dict.fromkeys(bad))} while the trained parameters "
                "are finite (predictions for which the metric is undefined, e.g. constant ones)")

    # ---- divergence --------------------------------------------------------------------------------------------------
    def _guard(self) -> None:
        """Stop a diverged run before anything is evaluated or saved from its state: the first non-finite loss (kept
        on the device per micro-batch) or non-finite trained parameters, on any process. Collective: one gather of
        two integers per process, the only device sync it adds."""
        acc = self.accelerator
        local = torch.stack([self._losses.first_step(acc.device),
                             (~all_finite([p for _, p in self._trained], acc.device)).long()])
        flags = acc.gather(local).view(-1, 2).tolist()
        if not any(loss_step or bad for loss_step, bad in flags):
            self._checked_step = self.step
            return
        details = gather_object([self._divergence_detail()])
        losses = [d for d in details if d["loss_step"]]
        if losses:
            first = min(losses, key=lambda d: d["loss_step"])
            what = (f"the loss became {format_nonfinite(first['loss'])} at step {first['loss_step']} "
                    f"(of {self.max_steps}; peak learning rate {self._peak_learning_rate():g})")
        else:
            first = next(d for d in details if d["parameters"])
            when = (f"at step {self.step}" if self._checked_step == self.step - 1
                    else f"between steps {self._checked_step} and {self.step}")
            what = (f"the trained parameters became {first['kind']} {when} (e.g. "
                    f"{', '.join(repr(n) for n in first['parameters'])}) while the loss stayed finite (of "
                    f"{self.max_steps}; peak learning rate {self._peak_learning_rate():g})")
        self._stop_diverged(what)

    def _divergence_detail(self) -> dict[str, Any]:
        """What this process saw diverge (read only once the run is known to have diverged)."""
        step, loss = self._losses.first()
        parameters = nonfinite_names(self._trained)
        first = dict(self._trained)[parameters[0]] if parameters else None
        kind = "NaN" if first is not None and bool(torch.isnan(first).any()) else "inf"
        return {"loss_step": step, "loss": loss, "parameters": parameters, "kind": kind}

    def _peak_learning_rate(self) -> float:
        return max(group.get("initial_lr", group["lr"]) for group in self.optimizer.param_groups)

    def _stop_diverged(self, what: str) -> None:
        """End the run on every process; the main process's error line says what diverged, what to change and which
        checkpoint is the last good one (no checkpoint is ever saved from a diverged state)."""
        self._close()
        if not self.accelerator.is_main_process:
            raise _MainProcessFailed()
        last = newest_intact_checkpoint(self.output_dir)
        where = f"the last good checkpoint is {last}" if last is not None else "no checkpoint was saved"
        raise TrainingDiverged(f"{what}; {self.recipe.divergence_advice(self)}; {where}")

    def _on_main_process(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on the main process only, its (picklable) result sent to the others; when it fails there,
        the others stop quietly and the main process's error is the run's one error line."""
        acc = self.accelerator
        if acc.num_processes == 1:
            return compute()
        message: list[Any] = [None]
        if acc.is_main_process:
            try:
                message = [(True, compute())]
            except BaseException:
                broadcast_object_list([(False, None)], from_process=0)
                raise
        broadcast_object_list(message, from_process=0)
        succeeded, value = message[0]
        if not succeeded:
            raise _MainProcessFailed()
        return value


class _MainProcessFailed(Exception):
    """On a process other than the main one: the main process failed in a block it runs first (and reports it)."""


def _main_process_succeeded(outcome: Optional[bool]) -> bool:
    """The main process sends whether its block succeeded (``outcome``); the others receive it (pass None)."""
    message = [outcome]
    broadcast_object_list(message, from_process=0)
    return bool(message[0])


class _LossWatch:
    """The first optimizer step whose micro-batch loss was NaN or infinite, and that loss, as device tensors: updated
    every micro-batch without a device sync, read at the loop's check points."""

    def __init__(self) -> None:
        self._step: Optional[torch.Tensor] = None  # 0 while every loss was finite
        self._loss: Optional[torch.Tensor] = None

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float().sum()
        if self._step is None or self._loss is None:
            self._step = torch.zeros((), dtype=torch.long, device=loss.device)
            self._loss = torch.zeros((), device=loss.device)
        first = ~torch.isfinite(loss) & (self._step == 0)
        self._step = torch.where(first, step, self._step)
        self._loss = torch.where(first, loss, self._loss)

    def first_step(self, device: torch.device) -> torch.Tensor:
        """The step as a 0-dim tensor on ``device`` (0: none); no sync."""
        return torch.zeros((), dtype=torch.long, device=device) if self._step is None else self._step.to(device)

    def first(self) -> tuple[int, float]:
        """``(step, loss)`` of the first non-finite loss, ``(0, 0.0)`` if none (a device sync)."""
        if self._step is None or self._loss is None:
            return 0, 0.0
        return int(self._step), float(self._loss)


class _Window:
    """Loss and samples since the last log line; the loss stays a tensor (no device sync per micro-batch)."""

    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes
        self._reset()

    def _reset(self) -> None:
        self.loss: Any = 0.0
        self.count = 0
        self.samples = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, batch: Any) -> None:
        self.loss = self.loss + loss.float()
        self.count += 1
        self.samples += batch_size(batch) * self.num_processes

    def flush(self, accelerator: Accelerator) -> dict[str, float]:
        """The mean loss over the window and every process (collective), and the samples per second."""
        mean = accelerator.reduce(self.loss / self.count, "mean").item()
        record = {"loss": mean, "samples_per_s": self.samples / max(time.perf_counter() - self.start, 1e-9)}
        self._reset()
        return record


def batch_size(batch: Any) -> int:
    """Examples in a batch: the leading size of its first tensor with one (a mapping's values, or a sequence)."""
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else [batch]
    for value in values:
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return int(value.shape[0])
    raise ValueError(f"cannot tell the number of examples of a {type(batch).__name__} batch (no tensor in it).")


def format_metrics(metrics: Mapping[str, float]) -> str:
    """``accuracy 0.9640, f1 0.9612`` for log lines and summaries."""
    return ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())


# ---- logging ---------------------------------------------------------------------------------------------------------
_HANDLER_MARK = "_gsoft_recipe_handler"
#: Hugging Face libraries: the environment variable each reads for its verbosity when it is first imported.
_LIBRARY_VERBOSITY = {"transformers": "TRANSFORMERS_VERBOSITY", "diffusers": "DIFFUSERS_VERBOSITY",
                      "datasets": "DATASETS_VERBOSITY", "huggingface_hub": "HF_HUB_VERBOSITY"}


def _printed_elsewhere(record: logging.LogRecord) -> bool:
    """Whether a logger between the record's and the root has its own handler (huggingface_hub and datasets do,
    and still propagate): the root's handler would print the message a second time."""
    name = record.name
    while name:
        logger = logging.Logger.manager.loggerDict.get(name)
        if isinstance(logger, logging.Logger) and logger.handlers:
            return True
        name = name.rpartition(".")[0]
    return False


def configure_logging(is_main_process: bool) -> None:
    """INFO lines on the main process; only errors on the others, whose notices would repeat the main one's.

    One stderr handler on the root logger (replaced, not added again, when a process runs several recipes); other
    handlers (a test's log capture) stay. Libraries that print through their own handler are not printed twice.
    On the other processes the Hugging Face libraries log errors only (also those imported later), their progress
    bars are off, and Python warnings go through logging, so they are dropped there too.
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    handler.addFilter(lambda record: not _printed_elsewhere(record))
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(logging.INFO if is_main_process else logging.ERROR)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one INFO line per file of every checkpoint
    if is_main_process:
        return
    logging.captureWarnings(True)
    os.environ.update({variable: "error" for variable in _LIBRARY_VERBOSITY.values()})
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    for name in _LIBRARY_VERBOSITY:
        module = sys.modules.get(name)
        if module is not None:
            module.utils.logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.disable_progress_bars()


# ---- the entry point -------------------------------------------------------------------------------------------------
def run_recipe(recipe: Recipe, settings: LoopSettings,
               loop_class: type[TrainLoop] = TrainLoop) -> Optional[dict[str, Any]]:
    """Run ``recipe`` as a script does: its results (None when stopped early), and every process leaves the process
    group together. A :data:`RECIPE_ERRORS` error, :class:`TrainingDiverged` or a swarm's
    :class:`~gsoft.distributed.volunteer.AveragingFailed` becomes ``SystemExit("<recipe>: error: <message>")``: one
    line and exit status 1, no traceback; so does a collective that failed because a peer process is gone
    (:func:`gsoft.distributed.collective_failure`). ``loop_class``: the loop (``common.volunteer.loop_class``)."""
    try:
        results = loop_class(recipe, settings).run()
    except (*RECIPE_ERRORS, TrainingDiverged, AveragingFailed) as exc:
        raise SystemExit(error_line(recipe.name, exc)) from exc
    except _MainProcessFailed:
        raise SystemExit(1) from None  # the main process prints the error
    except RuntimeError as exc:
        # A peer process died or hung: every surviving process says so in one line. No leave_process_group here:
        # its barrier needs the peer that is gone.
        failure = collective_failure(exc)
        if failure is None:
            raise
        raise SystemExit(error_line(recipe.name, failure)) from exc
    leave_process_group()
    return results


@contextlib.contextmanager
def naming_option(option: str, value: Any) -> Iterator[None]:
    """Prefix a :data:`RECIPE_ERRORS` error of the block with the option whose value caused it, e.g. a model that
    cannot be fetched: ``--model_name_or_path 'roberta-base': We couldn't connect to ...``."""
    try:
        yield
    except RECIPE_ERRORS as exc:
        kind = OSError if isinstance(exc, OSError) else ValueError
        raise kind(f"{option} {value!r}: {exc}") from exc


def error_line(prog: str, exc: BaseException) -> str:
    """``<prog>: error: <message>`` on one line (a multi-line message is joined)."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return f"{prog}: error: {message}"


__all__ = [
    "LoopSettings",
    "RECIPE_ERRORS",
    "Recipe",
    "TrainLoop",
    "Trainables",
    "TrainingDiverged",
    "batch_size",
    "configure_logging",
    "error_line",
    "format_metrics",
    "naming_option",
    "run_recipe",
]
