"""Mean teacher (Tarvainen & Valpola 2017, *Mean teachers are better role models*, arXiv:1703.01780): the
teacher is an exponential moving average of the student, ``θ_T ← d·θ_T + (1 − d)·θ_S`` after every optimizer step,
and a consistency loss pulls the student towards it on unlabeled rows (the adaptation objective: labeled source
rows, unlabeled target-domain rows, in one training set; labels -100 on the target rows).

The decay ramps up as in the paper's code, ``d_t = min(1 − 1/(t + 1), d)`` after step t, so that the early teacher
follows the quickly changing student; the consistency weight ramps up by ``DistillationConfig.
distillation_rampup_steps``. The two models see different stochastic views: the teacher keeps its dropout on in
training (``teacher_dropout``) and may get its own input noise (``teacher_noise``), the student its own
(``student_noise``, :mod:`hf_kd.noise`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import TrainerCallback

from ..config import DistillationConfig
from ..evaluation import count_parameters
from ..features import ModelFeatures, run_model
from ..noise import compose_noise
from ..teachers import LiveTeacher, check_materialized, freeze, unwrap
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import MODEL_FOLDER, Stage, pushed_by_the_caller, restore_push, train_measure_save

EMA_TEACHER = "ema_teacher"  # the teacher's name (logs: kl/…; card rows) and its stage folder beside the student


class EMATeacher(LiveTeacher):
    """The exponential moving average of the student as its teacher: a frozen copy of the student, updated after
    every optimizer step by the trainer it is given to (:meth:`attach` adds the callback), checkpointed with the
    loss parts and resumed exactly.

    One device and DDP (every process updates its copy from the same synchronised student, so all hold the same
    teacher). DeepSpeed and FSDP shard or own the student's parameters, which a whole-model average cannot read
    step by step: refused.

    Args:
        student: the student it averages (copied now; the trainer's student must be this model).
        decay: the EMA decay d in [0, 1), ramped up from 0 over the first steps (:meth:`decay_at`).
        dropout: the teacher runs with its dropout on while the student trains (a second perturbed view).
        noise: the teacher's own input noise while the student trains (a callable ``batch → batch`` or a list).

    Raises:
        ValueError: a decay outside [0, 1), or a student whose weights are not materialised.
    """

    def __init__(self, student: nn.Module, decay: float = 0.999, *, dropout: bool = True, noise=None):
        if not (isinstance(decay, (int, float)) and math.isfinite(decay) and 0.0 <= decay < 1.0):
            raise ValueError(f"the mean teacher's decay must lie in [0, 1), got {decay!r} (the paper: 0.99-0.999).")
        check_materialized(student, "student")
        super().__init__(freeze(copy.deepcopy(unwrap(student))))
        self.decay, self.dropout, self.noise = float(decay), dropout, compose_noise(noise)
        self.student: nn.Module | None = None

    def attach(self, trainer) -> None:
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
            raise ValueError(
                "a mean teacher (EMATeacher) averages the whole student after every step, and DeepSpeed / FSDP "
                "shard or own its parameters: train it on one device or with DDP (accelerate launch without a "
                "DeepSpeed or FSDP config)."
            )
        student = self.followed(trainer)
        shapes = [tuple(p.shape) for p in student.parameters()]
        if shapes != [tuple(p.shape) for p in self.model.parameters()]:
            raise ValueError(
                "the EMATeacher was copied from another model than the trainer's student (their parameters differ): "
                "build it as EMATeacher(student) from the model you pass as model=."
            )
        self.student = student
        self.model.to(next(student.parameters()).device)
        trainer.add_callback(_EMAUpdate(self))

    def followed(self, trainer) -> nn.Module:
        """The model this teacher averages: the trainer's student (a graph's EMA node follows one of its nodes).

        Args:
            trainer: the trainer it is attached to.

        Returns:
            The model, unwrapped.
        """
        return trainer.accelerator.unwrap_model(trainer.model)

    def decay_at(self, step: int) -> float:
        """The decay used by the update after an optimizer step: ``min(1 − 1/(step + 1), d)``.

        Args:
            step: the optimizer step just taken (1, 2, ...).

        Returns:
            The decay.
        """
        return min(1.0 - 1.0 / (step + 1), self.decay)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """``θ_T ← d·θ_T + (1 − d)·θ_S`` for every floating-point parameter and buffer (others are copied).

        Args:
            step: the optimizer step just taken, which sets ``d`` (:meth:`decay_at`).
        """
        decay = self.decay_at(step)
        pairs = list(zip(self.model.parameters(), self.student.parameters()))
        pairs += list(zip(self.model.buffers(), self.student.buffers()))
        averaged = [(t, s.detach()) for t, s in pairs if t.is_floating_point()]
        if averaged:
            targets, sources = [t for t, _ in averaged], [s for _, s in averaged]
            torch._foreach_mul_(targets, decay)
            torch._foreach_add_(targets, sources, alpha=1.0 - decay)
        for target, source in pairs:
            if not target.is_floating_point():
                target.copy_(source)

    def __call__(self, inputs: dict, needs: frozenset[str], sample_index: torch.Tensor | None = None) -> ModelFeatures:
        # Training: the teacher's own stochastic view (its dropout, its input noise); evaluation: deterministic.
        training = self.student is not None and self.student.training
        self.model.train(training and self.dropout)
        if training and self.noise is not None:
            inputs = self.noise(inputs)
        with torch.no_grad():
            return run_model(self.model, self.inputs(inputs), needs, module_root=self.model)[1]

    def state_dict(self) -> dict[str, torch.Tensor]:
        # The parameters as one vector: tied weights (an LM head on the embeddings) are one parameter, stored once.
        state = {"parameters": nn.utils.parameters_to_vector(self.model.parameters()).detach().clone()}
        state.update({f"buffer.{name}": b.detach().clone() for name, b in self.model.named_buffers()})
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        vector = state["parameters"].to(next(self.model.parameters()).device)
        with torch.no_grad():
            nn.utils.vector_to_parameters(vector, self.model.parameters())
            for name, buffer in self.model.named_buffers():
                if f"buffer.{name}" in state:
                    buffer.copy_(state[f"buffer.{name}"])

    def describe(self) -> dict:
        return {
            "teacher": f"the student's exponential moving average (mean teacher, decay {self.decay})",
            "teacher_class": type(self.model).__name__,
            "teacher_parameters": count_parameters(self.model),
        }


class _EMAUpdate(TrainerCallback):
    """After every optimizer step (before that step's checkpoint is written): the teacher follows the student."""

    def __init__(self, teacher: EMATeacher):
        self.teacher = teacher

    def on_step_end(self, args, state, control, **kwargs):
        self.teacher.update(state.global_step)


@dataclass
class MeanTeacherConfig(SchemeConfig):
    """Settings of the mean teacher (Tarvainen & Valpola 2017): the student's EMA is its teacher. ``ema_decay`` lies
    in [0, 1); a ``consistency_loss`` of ``None`` keeps ``losses``; the teacher's dropout gives a second,
    independently perturbed view; ``input_noise`` is the strength given to ``make_noise``
    (:func:`~hf_kd.schemes.registry.run_scheme`; ``None`` or 0: no input noise), drawn separately for each view.

    Args:
        ema_decay: mean_teacher: the EMA decay d (ramped up from 0).
        consistency_loss: mean_teacher: the consistency loss (logit_mse as in the paper, kl, ...), replacing
            --losses.
        teacher_dropout: mean_teacher: the EMA teacher runs with dropout.
        input_noise: mean_teacher: token masking probability (text) or pixel noise std (images), both views.

    Raises:
        ValueError: ``ema_decay`` or ``input_noise`` outside [0, 1).
    """

    ema_decay: float = field(default=0.999, metadata={"help": "mean_teacher: the EMA decay d (ramped up from 0)."})
    consistency_loss: str | None = field(
        default="logit_mse",
        metadata={
            "help": "mean_teacher: the consistency loss (logit_mse as in the paper, kl, ...), replacing --losses."
        },
    )
    teacher_dropout: bool = field(default=True, metadata={"help": "mean_teacher: the EMA teacher runs with dropout."})
    input_noise: float | None = field(
        default=0.1,
        metadata={"help": "mean_teacher: token masking probability (text) or pixel noise std (images), both views."},
    )

    def __post_init__(self):
        if not 0.0 <= self.ema_decay < 1.0:  # False for NaN too
            raise ValueError(
                f"the mean teacher's ema_decay must lie in [0, 1), got {self.ema_decay!r} (the paper: 0.99-0.999)."
            )
        if self.input_noise is not None and not 0.0 <= self.input_noise < 1.0:
            raise ValueError(f"input_noise must lie in [0, 1), got {self.input_noise}.")


def mean_teacher(
    student: nn.Module,
    args: DistillationConfig,
    *,
    ema_decay: float = 0.999,
    consistency_loss: str | None = "logit_mse",
    teacher_dropout: bool = True,
    teacher_noise=None,
    student_noise=None,
    scheme: MeanTeacherConfig | None = None,
    **trainer_kwargs,
) -> list[Stage]:
    """Train ``student`` with its mean teacher on ``train_dataset`` (labeled source rows + unlabeled target rows)
    in ``args.output_dir``, resuming from its last checkpoint there; save the student to ``OUTPUT_DIR/model`` and
    the EMA teacher to ``OUTPUT_DIR/ema_teacher/model`` — often the better of the two, so both are measured on
    ``eval_dataset`` (``compare_with_teacher``: the card's table has a row each).

    Args:
        student: the student; its EMA copy is the teacher.
        args: the run's :class:`~hf_kd.DistillationConfig`.
        ema_decay: the EMA decay d in [0, 1).
        consistency_loss: the loss between the two (``logit_mse`` as in the paper, or ``kl``, ...) replacing
            ``args.losses``; ``None`` keeps ``args.losses``.
        teacher_dropout: the EMA teacher runs with dropout while the student trains.
        teacher_noise: the teacher's input noise (a callable ``batch → batch`` or a list).
        student_noise: the student's input noise.
        scheme: the scheme's settings, recorded in the student's summary (default: from the arguments above).
        **trainer_kwargs: passed to the trainer (``train_dataset``, ``eval_dataset``, ...).

    Returns:
        The stages ``student`` and ``ema_teacher``, both with the one trainer that trained them.
    """
    if scheme is None:  # what this call asks for, as the scheme records it (input noise: the given objects')
        scheme = MeanTeacherConfig(ema_decay, consistency_loss, teacher_dropout, None)
    if consistency_loss is not None:
        args = dataclasses.replace(args, losses=consistency_loss)
    from ..trainer import DistillationTrainer

    teacher = EMATeacher(student, ema_decay, dropout=teacher_dropout, noise=teacher_noise)
    trainer = DistillationTrainer(
        model=student,
        teacher_model={EMA_TEACHER: teacher},
        args=args,
        student_noise=student_noise,
        **trainer_kwargs,
    )
    trainer.scheme_config = scheme
    folder, metrics = args.output_dir, {}

    def measure(trainer):  # the student and its EMA teacher, each alone
        rows = trainer.compare_with_teacher() if trainer.eval_dataset is not None else {}
        metrics.update({name: _metrics(row) for name, row in rows.items()})
        trainer.stage_metrics = metrics.get("student", {})
        trainer.stage_details = {"scheme": "mean_teacher", "decay": ema_decay}
        if EMA_TEACHER in metrics:
            trainer.stage_details[EMA_TEACHER] = metrics[EMA_TEACHER]

    train_measure_save(trainer, os.path.join(folder, MODEL_FOLDER), measure)
    ema = Stage(EMA_TEACHER, os.path.join(folder, EMA_TEACHER), teacher.model, metrics.get(EMA_TEACHER, {}))
    if trainer.args.should_save:
        teacher.model.save_pretrained(ema.model_folder)
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(ema.model_folder)
    ema.trainer = trainer
    student_stage = Stage("student", folder, trainer.accelerator.unwrap_model(trainer.model), trainer.stage_metrics)
    student_stage.trainer = trainer
    return [student_stage, ema]


def _metrics(row: dict) -> dict:
    """A comparison row's metrics, without its size and speed columns."""
    return {key: value for key, value in row.items() if key not in ("parameters", "ms_per_example")}


@register_scheme("mean_teacher", config=MeanTeacherConfig, teachers="none")
def run_mean_teacher(config: MeanTeacherConfig, args: DistillationConfig, given: SchemeInputs) -> SchemeResult:
    """Mean teacher: the student's exponential moving average is its teacher, with consistency between two noised
    views on labeled and unlabeled rows (Tarvainen & Valpola 2017).

    Args:
        config: the decay, consistency loss, teacher dropout and input noise.
        args: the run's :class:`~hf_kd.DistillationConfig`.
        given: the student builder, data, noise builder and trainer arguments.

    Returns:
        The student's trainer, and the EMA teacher's stage.
    """
    noise = given.noise(config.input_noise)
    student, ema = mean_teacher(
        given.make_student(1),
        pushed_by_the_caller(args),
        ema_decay=config.ema_decay,
        consistency_loss=config.consistency_loss,
        teacher_dropout=config.teacher_dropout,
        teacher_noise=noise,  # the same kind of noise, drawn separately: two views
        student_noise=noise,
        scheme=config,
        **given.trainer_kwargs,
    )
    return SchemeResult(restore_push(student.trainer, args), [ema])
