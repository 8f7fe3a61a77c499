"""The recipes' scheme flags: ``--scheme offline|teacher_assistant|born_again|noisy_student|mean_teacher|dml|byot`` and
``--teachers A,B``
(several teachers, combined by ``--teacher_aggregation``). A recipe builds its data, teacher and a student factory,
then :func:`distil` runs the chosen scheme and hands back the trainer of the final student (for its evaluation,
save and push) with every stage before it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from ..config import DistillationConfig
from ..schemes.stages import MODEL_FOLDER, Stage
from .cli import sharding_engine

SCHEMES = ("offline", "teacher_assistant", "born_again", "noisy_student", "mean_teacher", "dml", "byot")


@dataclass
class SchemeArguments:
    scheme: str = field(
        default="offline",
        metadata={
            "help": "offline: one distillation run. teacher_assistant: teacher → assistant → student. born_again: "
            "--generations students of the student's architecture, each taught by the one before. noisy_student: "
            "--rounds of pseudo-labels + noised student inputs, each student the next teacher. mean_teacher: the "
            "student's exponential moving average is its teacher (--ema_decay, --consistency_loss); the recipe's "
            "teacher is then only a reference row of the results. dml: --peers students of the student's "
            "architecture learn from each other (deep mutual learning), no teacher; the best peer is the student. "
            "byot: exits after --exits blocks of the student learn from its own head (self-distillation).",
            "choices": list(SCHEMES),
        },
    )
    teachers: str | None = field(
        default=None,
        metadata={
            "help": "Several trained teachers (comma-separated folders), combined by --teacher_aggregation; they "
            "replace --teacher (the first one's tokenizer/processor is used)."
        },
    )
    assistant_hidden_size: int | None = field(
        default=None, metadata={"help": "teacher_assistant: the assistant's width (default: between the two)."}
    )
    assistant_layers: int | None = field(
        default=None, metadata={"help": "teacher_assistant: the assistant's depth (default: between the two)."}
    )
    generations: int = field(default=2, metadata={"help": "born_again: the number of generations."})
    ensemble_last: bool = field(
        default=False, metadata={"help": "born_again: the last generation learns from all earlier ones."}
    )
    rounds: int = field(default=1, metadata={"help": "noisy_student: the number of rounds."})
    pseudo_labels: str = field(
        default="soft", metadata={"help": "noisy_student: soft or hard.", "choices": ["soft", "hard"]}
    )
    pseudo_label_threshold: float = field(
        default=0.0, metadata={"help": "noisy_student: keep unlabeled rows the teacher is at least this sure of."}
    )
    balance_pseudo_labels: bool = field(default=False, metadata={"help": "noisy_student: even the classes."})
    input_noise: float = field(
        default=0.1,
        metadata={"help": "noisy_student: token masking probability (text) or pixel noise std (images)."},
    )
    student_dropout: float | None = field(
        default=0.1, metadata={"help": "noisy_student: the student's dropout rate while it trains."}
    )
    ema_decay: float = field(default=0.999, metadata={"help": "mean_teacher: the EMA decay d (ramped up from 0)."})
    consistency_loss: str = field(
        default="logit_mse",
        metadata={
            "help": "mean_teacher: the consistency loss (logit_mse as in the paper, kl, ...), replacing --losses."
        },
    )

    peers: int = field(default=2, metadata={"help": "dml: the number of peers (each a fresh student)."})
    dml_towards: str = field(
        default="peers",
        metadata={
            "help": "dml: each peer learns from every other peer (averaged), or from their ensemble.",
            "choices": ["peers", "ensemble"],
        },
    )

    exits: str | None = field(
        default=None,
        metadata={"help": "byot: the blocks to put exits after, e.g. 1,2 (default: every block but the last)."},
    )
    exit_bottleneck: int | None = field(default=None, metadata={"help": "byot: the exits' bottleneck width."})
    hint_weight: float = field(default=0.0, metadata={"help": "byot: the weight of the exits' feature hint."})
    save_exits: bool = field(
        default=False, metadata={"help": "byot: save the student with its exits (EarlyExitModel.from_pretrained)."}
    )

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"--scheme is one of {', '.join(SCHEMES)}; got {self.scheme!r}.")
        if self.teachers is not None and self.scheme in ("mean_teacher", "dml"):
            raise ValueError(f"--teachers with --scheme {self.scheme}: its teachers are trained with the student.")
        if self.exits is not None:
            try:
                self.exit_blocks = [int(block) for block in self.exits.split(",") if block.strip()]
            except ValueError:
                message = f"--exits takes comma-separated block numbers, e.g. 1,2; got {self.exits!r}."
                raise ValueError(message) from None
        else:
            self.exit_blocks = None
        if self.peers < 2:
            raise ValueError(f"--peers needs at least 2 (deep mutual learning), got {self.peers}.")
        if self.teachers is not None and self.scheme in ("teacher_assistant", "noisy_student"):
            raise ValueError(f"--teachers with --scheme {self.scheme}: it starts from one teacher.")

    def teacher_paths(self, teacher: str | None) -> list[str]:
        """The trained teachers given on the command line: ``--teachers``, else ``--teacher`` (may be none)."""
        if self.teachers is None:
            return [teacher] if teacher else []
        if teacher:
            raise ValueError("give either --teacher or --teachers, not both.")
        paths = [path.strip() for path in self.teachers.split(",") if path.strip()]
        if len(paths) < 2:
            raise ValueError(f"--teachers needs at least two comma-separated folders, got {self.teachers!r}.")
        return paths


def distil(
    scheme: SchemeArguments,
    args: DistillationConfig,
    *,
    teacher,
    make_student: Callable[[int], nn.Module],
    train_dataset,
    load_student: Callable[[str], nn.Module],
    make_assistant: Callable[[], nn.Module] | None = None,
    student_noise=None,
    **trainer_kwargs,
):
    """Run ``scheme`` and return ``(trainer of the final student, stages)``; the stages (none for ``offline``) are
    those before the final student, in order, for the recipes' results table. ``make_student(k)`` builds a fresh
    student (k: the generation or round); ``load_student(folder)`` reads a finished stage back on a rerun."""
    from ..trainer import DistillationTrainer

    if scheme.scheme == "offline":
        trainer = DistillationTrainer(
            model=make_student(1), teacher_model=teacher, args=args, train_dataset=train_dataset, **trainer_kwargs
        )
        trainer.train()
        return trainer, []
    if scheme.scheme == "mean_teacher":  # one trainer: refused under DeepSpeed/FSDP by EMATeacher, with its reason
        from ..schemes.mean_teacher import mean_teacher

        student, ema = mean_teacher(
            make_student(1),
            args,
            decay=scheme.ema_decay,
            consistency=scheme.consistency_loss,
            teacher_noise=student_noise,  # the same kind of noise, drawn separately: two views
            student_noise=student_noise,
            train_dataset=train_dataset,
            **trainer_kwargs,
        )
        return student.trainer, [ema]
    if scheme.scheme == "byot":  # one trainer: refused under DeepSpeed/FSDP by SelfDistillationTrainer
        from ..schemes.self_distillation import ExitView, block_paths, self_distillation

        student = make_student(1)
        blocks = scheme.exit_blocks or list(range(1, len(block_paths(student))))
        if not blocks:
            raise ValueError("--scheme byot puts exits after blocks before the last: give the student 2 or more.")
        trainer = self_distillation(
            student,
            args,
            exits_after=blocks,
            bottleneck=scheme.exit_bottleneck,
            hint_weight=scheme.hint_weight,
            save_exits=scheme.save_exits,
            train_dataset=train_dataset,
            **trainer_kwargs,
        )
        early, batch = trainer.early_exit_model, trainer.example_inputs()
        exits = [Stage(name, args.output_dir, ExitView(early, name, batch), {}) for name in early.exit_paths]
        return trainer, exits
    engine = sharding_engine(args)
    if engine is not None:
        raise SystemExit(
            f"--scheme {scheme.scheme} runs more than one Trainer in one process (its stages, or the best peer after "
            f"mutual learning), which {engine} does not support."
        )
    if scheme.scheme == "dml":
        from ..schemes.mutual_learning import mutual_learning

        peers = mutual_learning(
            [make_student(k) for k in range(1, scheme.peers + 1)],
            args,
            towards=scheme.dml_towards,
            train_dataset=train_dataset,
            **trainer_kwargs,
        )
        best = next((peer for peer in peers if peer.details["best"]), peers[0])
        others = [peer for peer in peers if peer is not best]
        return _best_peer_trainer(best, others, args, trainer_kwargs), others
    common = dict(load_student=load_student, train_dataset=train_dataset, **trainer_kwargs)
    if scheme.scheme == "teacher_assistant":
        from ..schemes.teacher_assistant import teacher_assistant

        if make_assistant is None:
            raise ValueError("this recipe has no assistant model for --scheme teacher_assistant.")
        stages = teacher_assistant(teacher, [make_assistant()], make_student(1), args, **common)
    elif scheme.scheme == "born_again":
        from ..schemes.born_again import born_again

        stages = born_again(
            teacher, make_student, args, generations=scheme.generations, ensemble_last=scheme.ensemble_last, **common
        )
    else:
        from ..schemes.noisy_student import noisy_student

        stages = noisy_student(
            teacher,
            make_student,
            args,
            rounds=scheme.rounds,
            pseudo_labels=scheme.pseudo_labels,
            threshold=scheme.pseudo_label_threshold,
            balance=scheme.balance_pseudo_labels,
            student_noise=student_noise,
            dropout=scheme.student_dropout,
            **common,
        )
    return _final_trainer(stages[-1], stages, args, teacher, trainer_kwargs), stages[:-1]


def _final_trainer(last: Stage, stages: list[Stage], args, teacher, trainer_kwargs):
    if last.trainer is not None:
        return last.trainer
    # The final stage finished in an earlier run and was read back: a trainer around it, for evaluation and saving.
    from ..trainer import DistillationTrainer

    with open(os.path.join(last.folder, MODEL_FOLDER, "distillation_config.json")) as handle:
        saved = json.load(handle)
    previous = stages[-2].model if len(stages) > 1 else teacher
    trainer = DistillationTrainer(model=last.model, teacher_model=previous, args=args, **trainer_kwargs)
    trainer.lineage, trainer.stage_metrics = saved.get("lineage"), saved.get("metrics")
    trainer.stage_details = saved.get("stage")
    return trainer


def _best_peer_trainer(best: Stage, others: list[Stage], args, trainer_kwargs):
    """After deep mutual learning: a trainer around the best peer (its teachers, the other peers, now frozen), for
    the recipe's evaluation, save and push; it records the cohort's run (steps, peers, metrics)."""
    from ..trainer import DistillationTrainer

    trainer = DistillationTrainer(
        model=best.model, teacher_model={peer.name: peer.model for peer in others}, args=args, **trainer_kwargs
    )
    summary = best.trainer.peer_summary(best.name)
    trainer.state.global_step = best.trainer.state.global_step
    trainer.stage_metrics, trainer.stage_details = summary.get("metrics"), summary["stage"]
    return trainer


def stage_rows(stages: list[Stage]) -> dict[str, nn.Module]:
    """Results-table rows for the stages before the final student."""
    from ..evaluation import count_parameters

    return {f"{stage.name} ({count_parameters(stage.model):,} parameters)": stage.model for stage in stages}
