"""Every override of a private ``transformers.Trainer`` method, in one place, each with the reason it exists.

``TrainerCompat`` is the base class :class:`~hf_kd.DistillationTrainer` extends; it reads the trainer's
``loss_parts``, ``token_level``, ``shift_labels``, ``labels_mark_positions`` and ``unshared_files``. These methods
are not part of Trainer's public API: pyproject bounds transformers to the major version they were written against.
"""

from __future__ import annotations

import os

import torch
from huggingface_hub import HfApi
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils.hub import PushInProgress

from ..checkpoints import RUN_SETUP_NAME, write_run_setup
from ..data import DISTILLATION_POSITIONS, SAMPLE_INDEX
from ..generation import ON_POLICY_KEY, student_rollout
from ..positions import ItemCounts, count_items, split_sample_index
from ..views import TEACHER_PREFIX, has_teacher_view
from .loss_parts import LOSS_OPTIMIZER_NAME, LOSS_PARTS_NAME

# What a checkpoint holds beside the student: resumable state, never part of the student pushed to the repo root.
CHECKPOINT_ONLY_FILES = (
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    LOSS_PARTS_NAME,
    RUN_SETUP_NAME,
    LOSS_OPTIMIZER_NAME,
    "global_step*",
    "latest",
    "zero_to_fp32.py",
    "pytorch_model_fsdp*",
    "optimizer_*",
)


class TrainerCompat(Trainer):
    """``transformers.Trainer`` with hf_kd's overrides of its private methods (each commented with its reason):
    the columns the teachers read kept, on-policy batches and whole-step item counts, the loss parts saved in and
    read from checkpoints, only the student saved and pushed. Constructed as a ``Trainer``."""

    def _set_signature_columns_if_needed(self):
        # Columns the student's forward does not take but the losses (sample_index) or the teacher read. A module
        # around models (peers, a model with exits, a sentence encoder, a ranker), whose forward passes everything on,
        # says what they take (signature_columns; save_checkpoint / load_checkpoint below: the same duck type).
        if self._signature_columns is None and hasattr(self.model, "signature_columns"):
            self._signature_columns = [*self.model.signature_columns(), "label", "label_ids", *self.label_names]
        super()._set_signature_columns_if_needed()
        for column in (SAMPLE_INDEX, DISTILLATION_POSITIONS):
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def _remove_unused_columns(self, dataset, description=None):
        # A teacher's view (teacher_* columns, see hf_kd.views) is read by the teacher, not the student's forward.
        self._set_signature_columns_if_needed()
        names = getattr(dataset, "column_names", None) or []
        taken = self._signature_columns
        taken += [column for column in names if column.startswith(TEACHER_PREFIX) and column not in taken]
        return super()._remove_unused_columns(dataset, description)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        # The micro-batches of one step are where on-policy KD swaps in the student's own samples (a fraction λ of
        # steps, decided the same way on every process), and where a step that teaches nothing is caught.
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        fraction = self.args.on_policy_fraction
        if fraction > 0 and batch_samples:
            draw = torch.Generator().manual_seed(self.args.seed * 1_000_003 + self.state.global_step)
            if torch.rand((), generator=draw).item() < fraction:
                batch_samples = [self._rollout(batch) for batch in batch_samples]
        counts = self._get_num_items_in_batch(batch_samples, device)
        if batch_samples and self.token_level and (counts.scale > 1 or self.accelerator.num_processes == 1):
            # Counts over the whole step (every process): a step in which no token carries a label or
            # distillation has loss 0 and teaches nothing, which a mislabeled data set does at every step.
            if (counts.labels + counts.positions).item() == 0:
                rows = sum(len(next(v for v in batch.values() if torch.is_tensor(v))) for batch in batch_samples)
                raise ValueError(
                    f"step {self.state.global_step + 1}: none of the tokens of its {rows} rows per process carries "
                    "a label or distillation (labels are -100 everywhere, so the loss would be 0). Label the tokens "
                    "to learn (the completion of a prompt), e.g. with hf_kd.generation.tokenize_prompt_completion, "
                    "or drop rows without supervised tokens."
                )
        return batch_samples, counts

    def _rollout(self, batch: dict) -> dict:
        if has_teacher_view(batch):
            raise ValueError(
                "on-policy distillation with a teacher's own view (teacher_* columns: another tokenizer or "
                "modality) is not supported: the student's samples would need converting to the teacher's view. Use "
                "on_policy_fraction=0."
            )
        batch = self._prepare_inputs(batch)
        inputs, sample_index = split_sample_index(batch)
        deepspeed = self.accelerator.state.deepspeed_plugin
        # Sharded weights (ZeRO-3, FSDP): every decoding step gathers them collectively, so every process keeps
        # stepping until all are done (as transformers' Seq2SeqTrainer decides).
        sharded = (deepspeed is not None and deepspeed.zero_stage == 3) or self.is_fsdp_enabled
        rollout = student_rollout(
            self.accelerator.unwrap_model(self.model), inputs, self.args.generation_kwargs, synced_gpus=sharded
        )
        return rollout if sample_index is None else {**rollout, SAMPLE_INDEX: sample_index}

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> ItemCounts:
        # The Trainer counts label tokens only; distillation also needs the distilled positions, over all
        # micro-batches and processes of a step, to normalise every term exactly under gradient accumulation.
        counts = count_items(
            batch_samples, self.token_level, self.shift_labels, self.labels_mark_positions, device, ON_POLICY_KEY
        )
        scale = 1
        if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
            counts = self.accelerator.gather(counts[None]).sum(0)
            scale = self.accelerator.num_processes
        return ItemCounts(labels=counts[0], positions=counts[1], scale=scale)

    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        # The loss parts' own optimizer under DeepSpeed/FSDP needs max_steps for its schedule, known only here.
        self.loss_parts.build_engine_optimizer(self, max_steps)
        return super()._prepare_for_training(max_steps, train_dataloader, resume_from_checkpoint)

    def _run_epoch(self, *args, **kwargs):
        # Resumed from a checkpoint saved at max_steps in the middle of an epoch, transformers' loop enters the epoch
        # and takes one more optimiser step before it checks max_steps: a finished run that is run again (a scheme
        # rerun in its folder) would move its weights. Nothing is left to train there.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # Learned loss parts resume with the student, outside its weights; written first, because the Trainer
        # pushes the checkpoint (hub_strategy) inside its own save.
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            self.loss_parts.save(folder)
            write_run_setup(folder, self.run_setup())  # compared when a run resumes from this checkpoint
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        # Every engine resumes through here (DeepSpeed skips _load_from_checkpoint), after the optimizers exist.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self.loss_parts.load(checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None):
        # A module around models (peers, a model with exits) saves them as from_pretrained folders, not as one
        # merged state dict (checkpoints too).
        if hasattr(self.model, "save_checkpoint"):
            if self.args.should_save:
                self.model.save_checkpoint(output_dir or self.args.output_dir, self.processing_class)
            return
        # Engines (ZeRO-1/2, FSDP2) hand over gathered state dicts in which tied weights arrive as separate copies.
        if state_dict is not None:
            state_dict = _without_tied_copies(self.accelerator.unwrap_model(self.model), state_dict)
        training = self._restore_use_cache()  # the saved config.json keeps the model's own key-value cache setting
        try:
            super()._save(output_dir, state_dict)
        finally:
            if training is not None:
                self._model_config().use_cache = training

    def _model_config(self):
        return getattr(self.accelerator.unwrap_model(self.model), "config", None)

    def _restore_use_cache(self) -> bool | None:
        """Give the model back the ``config.use_cache`` it came with (``given_use_cache``), which transformers'
        Trainer replaced by ``args.use_cache`` for training; returns the replaced value (``None``: nothing to do)."""
        config, given = self._model_config(), getattr(self, "given_use_cache", None)
        if given is None or config is None or getattr(config, "use_cache", None) in (None, given):
            return None
        training, config.use_cache = config.use_cache, given
        return training

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        # ... and reads them back itself (the Trainer's loader looks for one state dict).
        model = model if model is not None else self.model
        if hasattr(model, "load_checkpoint"):
            model.load_checkpoint(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # transformers' version pickles the arguments (training_args.bin) into both uploads; this one uploads the
        # student's files of the checkpoint to the repo root and, with hub_strategy checkpoint / all_checkpoints,
        # the checkpoint (learned loss parts included, so a run resumes from the Hub) — no pickle in either.
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(checkpoint_folder)
        if self.args.save_strategy == "steps":
            message = f"Training in progress, step {self.state.global_step}"
        else:
            message = f"Training in progress, epoch {int(self.state.epoch)}"
        upload = dict(
            repo_id=self.hub_model_id, token=self.args.hub_token, run_as_future=True, revision=self.args.hub_revision
        )
        jobs = [
            HfApi().upload_folder(
                folder_path=checkpoint_folder,
                commit_message=message,
                ignore_patterns=[*CHECKPOINT_ONLY_FILES, *self.unshared_files],
                **upload,
            )
        ]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            last = self.args.hub_strategy == HubStrategy.CHECKPOINT
            jobs.append(
                HfApi().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo="last-checkpoint" if last else os.path.basename(checkpoint_folder),
                    commit_message=message + ", checkpoint",
                    ignore_patterns=[TRAINING_ARGS_NAME],
                    **upload,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def init_hf_repo(self, token: str | None = None, private: bool | None = None) -> None:
        # With push_to_hub=True the Trainer creates the repo while it is built: an unreachable Hub must say so.
        try:
            super().init_hf_repo(token=token, private=private)
        except Exception as error:  # offline mode, connection refused, no permission
            raise RuntimeError(
                f"push_to_hub=True creates the Hub repo {self.args.hub_model_id or self.args.output_dir!r} when the "
                f"trainer is built, and that failed ({type(error).__name__}: {error}). Connect to the Hub (or unset "
                "HF_HUB_OFFLINE), or set push_to_hub=False and call trainer.push_to_hub() once it can be reached: "
                "save_model keeps the student locally meanwhile."
            ) from error


def _without_tied_copies(model: nn.Module, state_dict: dict) -> dict:
    """Drop the weights the model ties to another (``lm_head.weight`` to the input embeddings), which
    ``from_pretrained`` re-ties: saved whole they would double an embedding-sized file entry."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    drop = {
        target
        for target, source in tied.items()
        if target in state_dict and source in state_dict and torch.equal(state_dict[target], state_dict[source])
    }
    return {key: value for key, value in state_dict.items() if key not in drop} if drop else state_dict
