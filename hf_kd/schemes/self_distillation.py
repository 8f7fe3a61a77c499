"""Self-distillation through early exits (Zhang et al. 2019, *Be Your Own Teacher*, arXiv:1905.08094): classifier
exits are attached after chosen blocks of a network — a transformers encoder (BERT-like, ViT) or a CNN (ResNet) —
by forward hooks, with no change to the model's code. Every exit trains on the labels; the model's own head (the
deepest exit) teaches the shallower ones with the configured response losses and, optionally, a feature hint:

    L = CE(y, p_final) + Σ_exits [ w_ce·CE(y, p_e) + w_kd·Σᵢ wᵢ·Lᵢ(p_e, sg(p_final)) + λ·‖r_e(f_e) − sg(f_final)‖² ]

(``sg``: the teacher signal is detached, so the deepest exit gets no distillation gradient.) An exit pools the
block's output (mean over real tokens, or over the spatial grid), optionally through a bottleneck, into a linear
classifier; ``r_e`` projects its features onto the width of the final block's pooled output for the hint.

Saving writes the plain model (exits dropped: ``from_pretrained`` reads it as ever), or with ``save_exits=True`` also
the exits (``early_exits.json`` + ``early_exits.safetensors``), which :meth:`EarlyExitModel.from_pretrained` reads
back. :func:`exit_report` measures each exit's quality and latency, and the anytime rule "leave at the first exit
whose confidence reaches a threshold" with the accuracy-vs-latency trade-off it gives.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from ..checkpoints import load_saved_weights
from ..config import DistillationConfig
from ..evaluation import count_parameters
from ..features import ModelFeatures, capture_modules, pool
from ..model_kinds import base_model, is_regression, is_token_level, num_classes
from ..trainer import DistillationTrainer
from ..trainer.compat import TrainerCompat
from ..trainer.members import MemberModule, TrainedMembers
from ..trainer.reporting import run_summary, write_summary
from .registry import SchemeConfig, SchemeInputs, SchemeResult, register_scheme
from .stages import MODEL_FOLDER, Stage, pushed_by_the_caller, restore_push, train_measure_save

FINAL = "final"  # the member that is the model's own head (the deepest exit, the teacher)
EXITS_CONFIG, EXITS_WEIGHTS = "early_exits.json", "early_exits.safetensors"
_BLOCK_LISTS = ("layer", "layers", "stages", "blocks", "h")  # how models name the list of their blocks


def block_paths(model: nn.Module) -> list[str]:
    """The dotted paths of the model's blocks, in order (``bert.encoder.layer.0``, …; ``vit.layers.0``, …;
    ``resnet.encoder.stages.0``, …): the longest ``nn.ModuleList`` named like a block list.

    Args:
        model: the network.

    Returns:
        The blocks' module paths, first block first.

    Raises:
        ValueError: the model has no module list named ``layer``, ``layers``, ``stages``, ``blocks`` or ``h``.
    """
    lists = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in _BLOCK_LISTS
    ]
    if not lists:
        raise ValueError(
            f"{type(model).__name__} has no list of blocks named {_BLOCK_LISTS}: give the exits' module paths "
            "(exits_after=['encoder.block.1', ...]) instead of layer numbers."
        )
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{index}" for index in range(len(blocks))]


class ExitHead(nn.Module):
    """An exit: the block's output pooled to one vector, normalised, optionally through a bottleneck, classified;
    ``project`` maps its features to the final block's width for the hint.

    Args:
        width: the width of the block's pooled output.
        num_labels: the number of classes.
        bottleneck: the width of a bottleneck before the classifier (None or 0: none).
        hint_width: the final block's width, for the hint projector (None: no projector).
    """

    def __init__(self, width: int, num_labels: int, bottleneck: int | None, hint_width: int | None):
        super().__init__()
        layers: list[nn.Module] = [nn.LayerNorm(width)]
        if bottleneck:
            layers += [nn.Linear(width, bottleneck), nn.GELU()]
        self.features = nn.Sequential(*layers)
        feature_width = bottleneck or width
        self.classifier = nn.Linear(feature_width, num_labels)
        self.project = nn.Linear(feature_width, hint_width) if hint_width else None

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(pooled)
        return self.classifier(features), features


class _ExitReached(Exception):
    def __init__(self, output):
        self.output = output


class EarlyExitModel(MemberModule):
    """``model`` (a sequence or image classifier) with exits after the blocks ``exits_after`` — layer numbers (1 = the
    first block) or module paths. ``forward(**inputs)`` runs the model once and returns ``{member: (outputs,
    ModelFeatures)}`` for every exit (``exit1``, …; a path's exit is named ``exit@PATH``) and ``final`` (the model's
    own outputs); with ``labels``, every member's outputs carry its cross-entropy.

    Args:
        model: a sequence or image classifier (or its PEFT wrapper).
        exits_after: the blocks to put exits after: layer numbers (1 = the first block, the last one excluded) or
            module paths.
        bottleneck: the exits' bottleneck width (None: none).
        pooling: how an exit pools its block's output (``"auto"``: mean over real tokens, or over the spatial grid;
            see :func:`~hf_kd.features.pool`).
        hint: give each exit a projector onto the final block's width (for the feature hint).
        widths: the hidden width after each exit's block, when it cannot be read from the block's last parameter.

    Raises:
        ValueError: a token-level or regression model, no exits, a layer number out of range (or the last
            block), a block named twice, a model without a block list for layer numbers, or a block whose width
            cannot be read.
    """

    def __init__(
        self,
        model: nn.Module,
        exits_after: list[int | str],
        *,
        bottleneck: int | None = None,
        pooling: str = "auto",
        hint: bool = False,
        widths: list[int] | None = None,
    ):
        super().__init__()
        if is_token_level(model):
            raise ValueError(
                f"early exits pool each example to one vector and classify it; {type(model).__name__} predicts per "
                "token. Use a sequence or image classifier."
            )
        if is_regression(model):
            raise ValueError(
                f"early exits are classifiers trained with cross-entropy; {type(model).__name__} is a regression "
                "head (num_labels=1 or problem_type='regression')."
            )
        blocks = block_paths(model) if any(isinstance(point, int) for point in exits_after) else []
        if not exits_after:
            raise ValueError("exits_after is empty: name at least one block to put an exit after.")
        paths, names = [], []
        for point in exits_after:
            if isinstance(point, int):
                if not 1 <= point < len(blocks):
                    raise ValueError(
                        f"an exit after block {point}: {type(model).__name__} has blocks 1..{len(blocks)}, and after "
                        f"the last one its own head is the deepest exit; choose among 1..{len(blocks) - 1}."
                    )
                paths.append(blocks[point - 1])
                names.append(f"exit{point}")
            else:
                model.get_submodule(point)  # a clear AttributeError for a wrong path
                paths.append(point)
                names.append(f"exit@{point}")
        if len(set(paths)) != len(paths):
            raise ValueError(f"exits_after names a block twice: {exits_after}.")
        self.model = model
        self.exit_paths = dict(zip(names, paths))
        self.final_path = (blocks or block_paths(model))[-1]
        if widths is None:
            widths = [_block_width(model.get_submodule(path)) for path in paths]
        self.final_width = _block_width(model.get_submodule(self.final_path))
        self.bottleneck, self.pooling, self.hint = bottleneck, pooling, hint
        classes = num_classes(model)
        self.exits = nn.ModuleDict(
            {
                name: ExitHead(width, classes, bottleneck, self.final_width if hint else None)
                for name, width in zip(names, widths)
            }
        )
        self.exits_after = list(exits_after)

    def signature_columns(self) -> list[str]:
        """The inputs the model's forward takes (the Trainer keeps those data columns; a PEFT model's: its base's).

        Returns:
            The forward's parameter names.
        """
        return list(inspect.signature(base_model(self.model).forward).parameters)

    @property
    def members(self) -> list[str]:
        """The exits' names, shallowest first, then ``final``."""
        return [*self.exit_paths, FINAL]

    def forward(self, labels=None, **inputs) -> dict[str, tuple]:
        paths = [*self.exit_paths.values(), self.final_path]
        with capture_modules(self.model, paths) as captured:
            outputs = self.model(**inputs, labels=labels)
        mask = inputs.get("attention_mask")
        final_features = pool(captured[self.final_path], self.pooling, mask)
        results = {}
        for name, path in self.exit_paths.items():
            logits, features = self.exits[name](pool(captured[path], self.pooling, mask))
            hint = self.exits[name].project(features) if self.exits[name].project is not None else None
            loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=-100)
            results[name] = (
                SequenceClassifierOutput(loss=loss, logits=logits),
                ModelFeatures(logits=logits, hidden_states=None if hint is None else (hint,)),
            )
        results[FINAL] = (outputs, ModelFeatures(logits=outputs.logits, hidden_states=(final_features,)))
        return results

    def exit_logits(self, member: str, inputs: dict) -> torch.Tensor:
        """One member's logits, computing only what it needs: the model stops at the exit's block.

        Args:
            member: an exit's name, or ``final``.
            inputs: the model's inputs (no labels).

        Returns:
            The member's logits.

        Raises:
            RuntimeError: the forward pass ended without reaching the exit's block.
        """
        if member == FINAL:
            return self.model(**inputs).logits
        try:
            with _stop_at(self.model, self.exit_paths[member]):
                self.model(**inputs)
        except _ExitReached as reached:
            pooled = pool(reached.output, self.pooling, inputs.get("attention_mask"))
            return self.exits[member](pooled)[0]
        raise RuntimeError(f"the forward pass never reached the block of {member}.")

    def used_parameters(self, member: str, inputs: dict) -> list[nn.Parameter]:
        """The parameters ``member`` uses: those of every module that runs before its exit, and its head.

        Args:
            member: an exit's name, or ``final`` (every parameter of the model).
            inputs: one batch of model inputs, run to see which modules take part.

        Returns:
            The parameters, each once.
        """
        if member == FINAL:
            return list(self.model.parameters())
        ran: list[nn.Module] = []
        handles = [m.register_forward_pre_hook(lambda module, _: ran.append(module)) for m in self.model.modules()]
        try:
            with torch.no_grad():
                self.exit_logits(member, inputs)
        finally:
            for handle in handles:
                handle.remove()
        used = {id(p): p for module in ran for p in module.parameters(recurse=False)}
        return [*used.values(), *self.exits[member].parameters()]

    def exits_config(self) -> dict:
        """What ``early_exits.json`` holds: enough to rebuild the exits on the model.

        Returns:
            ``exits_after``, ``exit_paths``, ``bottleneck``, ``pooling``, ``hint`` and each exit's ``widths``.
        """
        return {
            "exits_after": self.exits_after,
            "exit_paths": self.exit_paths,
            "bottleneck": self.bottleneck,
            "pooling": self.pooling,
            "hint": self.hint,
            "widths": [head.features[0].normalized_shape[0] for head in self.exits.values()],
        }

    def save_pretrained(self, folder: str, with_exits: bool = True) -> None:
        """The model by ``save_pretrained`` (``from_pretrained`` reads it without exits) and, with ``with_exits``,
        its exits beside it.

        Args:
            folder: the folder.
            with_exits: also write ``early_exits.json`` and ``early_exits.safetensors``.
        """
        self.model.save_pretrained(folder)
        if with_exits:
            with open(os.path.join(folder, EXITS_CONFIG), "w") as handle:
                json.dump(self.exits_config(), handle, indent=2)
            state = {key: value.detach().contiguous() for key, value in self.exits.state_dict().items()}
            save_file(state, os.path.join(folder, EXITS_WEIGHTS))

    def load_exits(self, folder: str) -> None:
        """Read the exits' weights that :meth:`save_pretrained` wrote.

        Args:
            folder: the folder holding ``early_exits.safetensors``.
        """
        self.exits.load_state_dict(load_file(os.path.join(folder, EXITS_WEIGHTS)))

    @classmethod
    def from_pretrained(cls, folder: str, model_class=None, **kwargs) -> EarlyExitModel:
        """A folder :meth:`save_pretrained` wrote with its exits: the model through ``model_class.from_pretrained``
        (default: the class its config names) and the exits on it.

        Args:
            folder: the saved folder.
            model_class: the model's class (None: the first architecture its config names).
            **kwargs: passed to ``model_class.from_pretrained``.

        Returns:
            The model with its exits.

        Raises:
            FileNotFoundError: the folder has no ``early_exits.json`` (it was saved without exits).
            ValueError: no ``model_class`` given and the config names no architecture.
        """
        path = os.path.join(folder, EXITS_CONFIG)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{folder} has no {EXITS_CONFIG}: it holds the model without exits (load it with from_pretrained), or "
                "save it with save_exits=True."
            )
        with open(path) as handle:
            config = json.load(handle)
        if model_class is None:
            architectures = transformers.AutoConfig.from_pretrained(folder).architectures or []
            if not architectures:
                raise ValueError(f"the config in {folder} names no architecture: pass model_class=.")
            model_class = getattr(transformers, architectures[0])
        model = model_class.from_pretrained(folder, **kwargs)
        exits = [point if isinstance(point, str) else int(point) for point in config["exits_after"]]
        early = cls(
            model,
            exits,
            bottleneck=config["bottleneck"],
            pooling=config["pooling"],
            hint=config["hint"],
            widths=config["widths"],
        )
        early.load_exits(folder)
        return early

    # What the trainer's checkpoints hold: the model and its exits, one folder (see hf_kd.trainer.compat).
    def save_checkpoint(self, folder: str, processing_class=None) -> None:
        self.save_pretrained(folder, with_exits=True)
        if processing_class is not None:
            processing_class.save_pretrained(folder)

    def load_checkpoint(self, folder: str) -> None:
        if not os.path.exists(os.path.join(folder, EXITS_WEIGHTS)):
            raise ValueError(f"{folder} is not a checkpoint of this model with exits (it has no {EXITS_WEIGHTS}).")
        load_saved_weights(self.model, folder, "this model with exits")  # a PEFT model: its adapter
        self.load_exits(folder)


class ExitView(nn.Module):
    """One member of an :class:`EarlyExitModel` as a model of its own: ``forward`` runs the network up to the exit's
    block only (as an early-exit deployment would) and returns its logits — for evaluation tables and latency."""

    def __init__(self, early: EarlyExitModel, member: str, example_inputs: dict):
        """Build the view of ``member``.

        Args:
            early: the model with its exits.
            member: an exit's name, or ``final``.
            example_inputs: one batch, to find the parameters the member uses (``parameters()`` yields those).
        """
        super().__init__()
        self.early, self.member = early, member
        self.config = early.model.config  # what evaluation helpers read (num_labels, ...)
        self._used = early.used_parameters(member, example_inputs)

    def parameters(self, recurse: bool = True):
        return iter(self._used)

    # The inputs named, so that a Trainer's column filter (which reads this signature) keeps them.
    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        token_type_ids=None,
        pixel_values=None,
        input_values=None,
        labels=None,
        **kwargs,
    ):
        given = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            pixel_values=pixel_values,
            input_values=input_values,
        )
        inputs = {key: value for key, value in given.items() if value is not None} | kwargs
        logits = self.early.exit_logits(self.member, inputs)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels, ignore_index=-100)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _block_width(block: nn.Module) -> int:
    """The width of a block's output, read from its last parameter (a final norm's or convolution's)."""
    parameters = list(block.parameters())
    if not parameters:
        raise ValueError(f"cannot read the output width of {type(block).__name__} (no parameters): pass widths=.")
    return parameters[-1].shape[0]


@contextlib.contextmanager
def _stop_at(model: nn.Module, path: str):
    """End the forward pass at the block ``path``, raising ``_ExitReached`` with its output."""

    def hook(_module, _inputs, output):
        raise _ExitReached(output[0] if isinstance(output, (tuple, list)) else output)

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class ExitTeaching(TrainedMembers):
    """Self-distillation's members: the model's own head (``final``) teaches every exit with the configured response
    losses, and with ``hint_weight`` > 0 the exits' hint projections match its features.

    Args:
        early: the model with its exits.
        hint_weight: the weight of the exits' feature hint (0: no hint term).
    """

    scheme, kind = "self-distillation", "exit"

    def __init__(self, early: EarlyExitModel, hint_weight: float):
        super().__init__(early.members, early.model, ("hint",) if hint_weight > 0 else ())
        self.hint_weight = hint_weight

    def evaluation_logits(self, detached):
        return detached[FINAL].logits  # the model's own head: the model as deployed without exits

    def teachers_of(self, member, detached, term):
        return [] if member == FINAL else [detached[FINAL]]

    def extra_terms(self, member, results, sources):
        if self.hint_weight == 0 or member == FINAL:
            return {}
        exit_features = results[member][1].hidden_states[-1]
        final_features = results[FINAL][1].hidden_states[-1].detach()
        return {"hint": self.hint_weight * F.mse_loss(exit_features.float(), final_features.float())}

    def logits_alone(self, module, member, inputs):
        return module.exit_logits(member, inputs)

    def model_of(self, module, member):
        return module.model if member == FINAL else module.exits[member]


class SelfDistillationTrainer(DistillationTrainer):
    """Trains an :class:`EarlyExitModel` by self-distillation: a :class:`~hf_kd.DistillationTrainer` whose members
    (:class:`ExitTeaching`) are the model's exits and its own head (``final``), which teaches them. Logged per member:
    ``ce/exit1``, ``kl/exit1``, ``hint/exit1``, …, ``ce/final``; evaluation adds each member's ``compute_metrics``
    (``eval_exit1_accuracy``, …).

    ``save_model`` writes the plain model (exits dropped), or with ``save_exits=True`` also the exits, and a push
    uploads the same (``push_to_hub``, and with ``push_to_hub=True`` every checkpoint's push of the model); checkpoints
    always hold both, and resume them.

    Args:
        model: the network with its exits.
        args: the run's :class:`~hf_kd.DistillationConfig`; its losses must be response losses.
        hint_weight: the weight of the exits' feature hint towards the final features (0: none).
        save_exits: whether ``save_model`` and pushes keep the exits beside the model.
        **kwargs: what :class:`~hf_kd.DistillationTrainer` takes beside ``teacher_model``.

    Raises:
        TypeError: ``model`` is not an :class:`EarlyExitModel`.
        ValueError: a bad ``hint_weight``, or an option the scheme cannot take.
    """

    def __init__(
        self,
        model: EarlyExitModel,
        args: DistillationConfig | None = None,
        *,
        hint_weight: float = 0.0,
        save_exits: bool = False,
        **kwargs,
    ):
        if not isinstance(model, EarlyExitModel):
            raise TypeError(
                f"SelfDistillationTrainer trains an EarlyExitModel (the model with its exits), got "
                f"{type(model).__name__}: wrap it as EarlyExitModel(model, exits_after=[1, 2])."
            )
        if not (hint_weight >= 0 and hint_weight != float("inf")):
            raise ValueError(f"hint_weight must be a finite number >= 0, got {hint_weight}.")
        if hint_weight > 0 and not model.hint:
            raise ValueError("hint_weight > 0 needs exits with hint projectors: EarlyExitModel(..., hint=True).")
        if hint_weight == 0 and model.hint:  # hint projectors no loss reads: DDP would stop on unused parameters
            for head in model.exits.values():
                head.project.requires_grad_(False)
        super().__init__(model=model, args=args, members=ExitTeaching(model, float(hint_weight)), **kwargs)
        self.hint_weight, self.save_exits = float(hint_weight), save_exits

    @property
    def early_exit_model(self) -> EarlyExitModel:
        """The model with its exits, unwrapped."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def student(self) -> nn.Module:
        """The model without its exits (what ``save_model`` writes by default)."""
        return self.early_exit_model.model

    @property
    def unshared_files(self) -> tuple[str, ...]:
        """Never pushed with the model: the exits too, unless ``save_exits`` (checkpoints keep them to resume)."""
        return (*super().unshared_files, *(() if self.save_exits else (EXITS_CONFIG, EXITS_WEIGHTS)))

    def parameters_of(self, role: str) -> int:
        return sum(p.numel() for p in self.early_exit_model.used_parameters(role, self.example_inputs()))

    def example_inputs(self) -> dict:
        """One batch of model inputs (no labels), from the evaluation set or else the training set.

        Returns:
            The batch's inputs that the model's forward takes, on the trainer's device.
        """
        loader = self.get_eval_dataloader() if self.eval_dataset is not None else self.get_train_dataloader()
        taken = set(self.early_exit_model.signature_columns()) - {"labels"}
        return {key: value for key, value in self._prepare_inputs(next(iter(loader))).items() if key in taken}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The plain model (``from_pretrained`` reads it; exits dropped), with ``save_exits`` its exits too, and
        ``distillation_config.json``. Checkpoints always hold the exits.

        Args:
            output_dir: the folder (default ``args.output_dir``).
            _internal_call: set by the Trainer's own saves (checkpoints), which keep the exits.
        """
        output_dir = output_dir or self.args.output_dir
        TrainerCompat.save_model(self, output_dir, _internal_call)  # compat._save: the model with its exits
        if not self.args.should_save:
            return
        if not _internal_call and not self.save_exits:
            for name in (EXITS_CONFIG, EXITS_WEIGHTS):
                path = os.path.join(output_dir, name)
                if os.path.exists(path):
                    os.remove(path)
        write_summary(output_dir, self.distillation_summary())

    def distillation_summary(self) -> dict:
        early = self.early_exit_model
        return {
            "teacher": "its own deepest exit (self-distillation)",
            "teacher_class": type(early.model).__name__,
            "teacher_parameters": count_parameters(early.model),
            **run_summary(self, early.model),
            "stage": {
                "scheme": "self_distillation",
                "exits": early.exits_config(),
                "hint_weight": self.hint_weight,
                "exits_saved": self.save_exits,
                **({"metrics": self.comparison} if self.comparison else {}),
            },
        }


@dataclass
class SelfDistillationConfig(SchemeConfig):
    """Settings of self-distillation through early exits (Zhang et al. 2019, *Be Your Own Teacher*): exits after the
    blocks numbered from 1 (``None``: every block but the last), an optional bottleneck (``None``: none), the weight
    of the exits' feature hint towards the deepest features (0: none), and whether the saved model keeps its exits.

    Args:
        exits_after: self_distillation: the blocks to put exits after, e.g. 1 2 (default: all but the last).
        exit_bottleneck: self_distillation: the exits' bottleneck width.
        hint_weight: self_distillation: the weight of the exits' hint.
        save_exits: self_distillation: save the student with its exits (EarlyExitModel.from_pretrained).

    Raises:
        ValueError: an empty ``exits_after``, or a negative (or NaN) ``hint_weight``.
    """

    exits_after: list[int] | None = field(
        default=None,
        metadata={"help": "self_distillation: the blocks to put exits after, e.g. 1 2 (default: all but the last)."},
    )
    exit_bottleneck: int | None = field(
        default=None, metadata={"help": "self_distillation: the exits' bottleneck width."}
    )
    hint_weight: float = field(default=0.0, metadata={"help": "self_distillation: the weight of the exits' hint."})
    save_exits: bool = field(
        default=False,
        metadata={"help": "self_distillation: save the student with its exits (EarlyExitModel.from_pretrained)."},
    )

    def __post_init__(self):
        if self.exits_after is not None and not self.exits_after:
            raise ValueError("exits_after is empty: give the blocks to put exits after, or None for all but the last.")
        if not self.hint_weight >= 0:  # False for NaN too
            raise ValueError(f"hint_weight must be >= 0, got {self.hint_weight}.")


def self_distillation(
    model: nn.Module,
    args: DistillationConfig,
    *,
    exits_after: list[int | str],
    exit_bottleneck: int | None = None,
    hint_weight: float = 0.0,
    save_exits: bool = False,
    scheme: SelfDistillationConfig | None = None,
    **trainer_kwargs,
) -> SelfDistillationTrainer:
    """Attach exits after the blocks ``exits_after`` of ``model``, train it by self-distillation in
    ``args.output_dir`` (resuming from its last checkpoint there), measure every exit on ``eval_dataset``
    (``trainer.comparison``) and save the model to ``OUTPUT_DIR/model`` (with its exits when ``save_exits``).

    Args:
        model: the network (a sequence or image classifier).
        args: the run's :class:`~hf_kd.DistillationConfig`.
        exits_after: the blocks to put exits after (layer numbers from 1, or module paths).
        exit_bottleneck: the exits' bottleneck width (None: none).
        hint_weight: the weight of the exits' feature hint (0: none).
        save_exits: keep the exits in the saved model.
        scheme: the scheme's settings, recorded in the summary (default: from the arguments above).
        **trainer_kwargs: passed to the :class:`SelfDistillationTrainer` (``train_dataset``, ``eval_dataset``, ...).

    Returns:
        The trained trainer; ``trainer.early_exit_model`` is the model with its exits.
    """
    early = EarlyExitModel(model, exits_after, bottleneck=exit_bottleneck, hint=hint_weight > 0)
    trainer = SelfDistillationTrainer(early, args, hint_weight=hint_weight, save_exits=save_exits, **trainer_kwargs)
    trainer.scheme_config = (
        scheme
        if scheme is not None
        else SelfDistillationConfig(list(exits_after), exit_bottleneck, hint_weight, save_exits)
    )
    measure = (lambda trainer: trainer.compare_with_teacher()) if trainer.eval_dataset is not None else None
    train_measure_save(trainer, os.path.join(args.output_dir, MODEL_FOLDER), measure)  # every exit alone
    return trainer


@torch.no_grad()
def exit_report(
    model: EarlyExitModel,
    dataset,
    *,
    data_collator=None,
    batch_size: int = 64,
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99),
    device: str | torch.device = "cpu",
) -> dict[str, dict]:
    """Accuracy and latency of every exit alone (the model stopped at its block), and of the anytime rule "leave at
    the first exit whose top probability reaches the threshold, else at the final head" for each threshold:
    its accuracy, mean milliseconds per example (each example charged the measured latency of the exit it left at)
    and the share of examples leaving at each member.

    Args:
        model: the model with its exits.
        dataset: labeled rows.
        data_collator: batches the rows (default: ``default_data_collator``).
        batch_size: rows per batch.
        thresholds: the anytime rule's confidence thresholds.
        device: where the model runs.

    Returns:
        Rows keyed ``exit1``…, ``final``, ``threshold 0.9``…, each with ``accuracy`` and ``ms_per_example`` (the
            thresholds' also ``share MEMBER``).
    """
    from torch.utils.data import DataLoader

    model = model.to(device).eval()
    collate = data_collator or transformers.default_data_collator
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    members = model.members
    seconds = dict.fromkeys(members, 0.0)
    probabilities = {member: [] for member in members}
    labels = []
    for batch in loader:
        batch = {key: value.to(device) for key, value in batch.items() if torch.is_tensor(value)}
        labels.append(batch.pop("labels"))
        inputs = {key: value for key, value in batch.items() if key != "sample_index"}
        for member in members:
            model.exit_logits(member, inputs)  # warm-up, so the timing is not the first call's
            start = time.perf_counter()
            logits = model.exit_logits(member, inputs)
            seconds[member] += time.perf_counter() - start
            probabilities[member].append(logits.float().softmax(-1))
    labels = torch.cat(labels)
    probabilities = {member: torch.cat(values) for member, values in probabilities.items()}
    n = len(labels)
    ms = {member: 1000 * seconds[member] / n for member in members}
    rows = {}
    for member in members:
        correct = probabilities[member].argmax(-1).eq(labels).float().mean().item()
        rows[member] = {"accuracy": correct, "ms_per_example": ms[member]}
    for threshold in thresholds:
        chosen = torch.full((n,), len(members) - 1, dtype=torch.long)
        for index in reversed(range(len(members) - 1)):  # the first confident exit wins
            confident = probabilities[members[index]].max(-1).values >= threshold
            chosen[confident] = index
        stacked = torch.stack([probabilities[member].argmax(-1) for member in members], dim=1)
        predicted = stacked[torch.arange(n), chosen]
        latency = torch.tensor([ms[member] for member in members])[chosen]
        rows[f"threshold {threshold:g}"] = {
            "accuracy": predicted.eq(labels).float().mean().item(),
            "ms_per_example": latency.mean().item(),
            **{f"share {member}": chosen.eq(index).float().mean().item() for index, member in enumerate(members)},
        }
    return rows


@register_scheme("self_distillation", config=SelfDistillationConfig, teachers="none")
def run_self_distillation(
    config: SelfDistillationConfig, args: DistillationConfig, given: SchemeInputs
) -> SchemeResult:
    """Self-distillation (be your own teacher): exits after the student's blocks learn from its own deepest exit.

    Args:
        config: the exits, bottleneck, hint weight and whether the exits are saved.
        args: the run's :class:`~hf_kd.DistillationConfig`.
        given: the student builder, data and trainer arguments.

    Returns:
        The trainer of the model with its exits, and a stage per exit (an :class:`ExitView`, not measured).

    Raises:
        ValueError: a student with a single block and no ``exits_after``.
    """
    student = given.make_student(1)
    blocks = config.exits_after or list(range(1, len(block_paths(student))))
    if not blocks:
        raise ValueError("self_distillation puts exits after blocks before the last: give the student 2 or more.")
    trainer = self_distillation(
        student,
        pushed_by_the_caller(args),
        exits_after=blocks,
        exit_bottleneck=config.exit_bottleneck,
        hint_weight=config.hint_weight,
        save_exits=config.save_exits,
        scheme=config,
        **given.trainer_kwargs,
    )
    early, batch = trainer.early_exit_model, trainer.example_inputs()
    exits = [Stage(name, args.output_dir, ExitView(early, name, batch), {}) for name in early.exit_paths]
    return SchemeResult(restore_push(trainer, args), exits)
