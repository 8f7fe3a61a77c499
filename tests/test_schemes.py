"""Multi-stage schemes: teacher assistant chains and born-again generations — stage folders, lineage, reloading
each stage, resuming after a failed stage without redoing the finished ones."""

import json
import logging

import pytest
import torch
from conftest import classification_data, config, tiny_bert
from transformers import BertForSequenceClassification

from hf_kd.checkpoints import last_complete_checkpoint
from hf_kd.metrics import classification_metrics
from hf_kd.schemes.born_again import born_again
from hf_kd.schemes.teacher_assistant import teacher_assistant


def summary(stage):
    with open(f"{stage.model_folder}/distillation_config.json") as handle:
        return json.load(handle)


def test_teacher_assistant_chain_records_lineage_and_reloads_every_stage(tmp_path):
    teacher = tiny_bert(hidden=32, layers=4, seed=1)
    assistant, student = tiny_bert(hidden=24, layers=2, seed=2), tiny_bert(hidden=16, layers=1, seed=3)
    data = classification_data()
    stages = teacher_assistant(
        teacher,
        [assistant],
        student,
        config(tmp_path, max_steps=2),
        train_dataset=data,
        eval_dataset=data,
        compute_metrics=classification_metrics,
    )
    assert [stage.name for stage in stages] == ["assistant1", "student"]
    first, last = summary(stages[0]), summary(stages[1])
    assert [entry["stage"] for entry in first["lineage"]] == ["teacher"]
    assert [entry["stage"] for entry in last["lineage"]] == ["teacher", "assistant1"]
    assert last["lineage"][1]["parameters"] == sum(p.numel() for p in assistant.parameters())
    assert "eval_accuracy" in last["lineage"][1]["metrics"] and "eval_accuracy" in last["metrics"]
    # The student's teacher is the assistant, not the original teacher.
    assert last["teacher_parameters"] == sum(p.numel() for p in assistant.parameters())
    for stage, model in zip(stages, (assistant, student)):
        reloaded = BertForSequenceClassification.from_pretrained(stage.model_folder)
        assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


class _Broken(torch.nn.Module):
    """A student that fails in its forward: the stage it is in dies."""

    def __init__(self):
        super().__init__()
        self.config = tiny_bert().config
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, labels=None):
        raise RuntimeError("this student is broken")


def test_a_failed_stage_leaves_the_earlier_ones_and_the_rerun_does_not_redo_them(tmp_path):
    data = classification_data()
    args = config(tmp_path, max_steps=2)
    teacher, assistant = tiny_bert(hidden=32, layers=4, seed=1), tiny_bert(hidden=24, layers=2, seed=2)
    with pytest.raises(RuntimeError, match="this student is broken"):
        teacher_assistant(teacher, [assistant], _Broken(), args, train_dataset=data)
    saved = (tmp_path / "assistant1" / "model" / "model.safetensors").stat().st_mtime_ns
    loaded = []

    def load(folder):
        loaded.append(folder)
        return BertForSequenceClassification.from_pretrained(folder)

    with pytest.raises(ValueError, match="finished in an earlier run"):
        teacher_assistant(teacher, [assistant], tiny_bert(hidden=16, layers=1, seed=3), args, train_dataset=data)
    stages = teacher_assistant(
        teacher, [assistant], tiny_bert(hidden=16, layers=1, seed=3), args, load_student=load, train_dataset=data
    )
    assert loaded == [str(tmp_path / "assistant1" / "model")]  # read back, not trained again
    assert (tmp_path / "assistant1" / "model" / "model.safetensors").stat().st_mtime_ns == saved
    assert summary(stages[1])["lineage"][1]["stage"] == "assistant1"


def test_a_stage_resumes_from_its_last_checkpoint(tmp_path):
    data = classification_data()
    teacher, assistant = tiny_bert(hidden=32, layers=4, seed=1), tiny_bert(hidden=24, layers=2, seed=2)
    args = config(tmp_path, max_steps=4, save_strategy="steps", save_steps=2)
    stages = teacher_assistant(teacher, [assistant], tiny_bert(hidden=16, layers=1, seed=3), args, train_dataset=data)
    (tmp_path / "student" / "model" / "distillation_config.json").unlink()  # as if it died after its last checkpoint
    again = teacher_assistant(
        teacher,
        [assistant],
        tiny_bert(hidden=16, layers=1, seed=3),
        args,
        load_student=BertForSequenceClassification.from_pretrained,
        train_dataset=data,
    )
    assert summary(again[1])["steps"] == 4
    state = json.loads((tmp_path / "student" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    reloaded = BertForSequenceClassification.from_pretrained(stages[1].model_folder)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), again[1].model.state_dict().values()))


def test_born_again_generations_learn_from_the_previous_one_and_the_last_from_all(tmp_path):
    teacher = tiny_bert(hidden=16, seed=1)
    generations = born_again(
        teacher,
        lambda generation: tiny_bert(hidden=16, seed=10 + generation),
        config(tmp_path, max_steps=2),
        generations=3,
        ensemble_last=True,
        train_dataset=classification_data(),
    )
    assert [stage.name for stage in generations] == ["generation1", "generation2", "generation3"]
    second, third = summary(generations[1]), summary(generations[2])
    assert [entry["stage"] for entry in second["lineage"]] == ["teacher", "generation1"]
    assert list(third["teachers"]) == ["teacher", "generation1", "generation2"]  # the ensemble of all before it
    assert [entry["stage"] for entry in third["lineage"]] == ["teacher", "generation1", "generation2"]
    with pytest.raises(ValueError, match="generations >= 1"):
        born_again(teacher, lambda generation: tiny_bert(), config(tmp_path), generations=0)


def _checkpoint(folder, step, state="whole"):
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if state == "whole":
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    elif state == "truncated":  # killed while writing it
        (path / "trainer_state.json").write_text('{"global_step": ')
    return str(path)


def test_resuming_skips_the_checkpoints_a_kill_inside_a_save_left_incomplete(tmp_path, caplog):
    assert last_complete_checkpoint(str(tmp_path / "never-ran")) is None
    assert last_complete_checkpoint(str(tmp_path)) is None
    complete = _checkpoint(tmp_path, 9)
    _checkpoint(tmp_path, 2)
    (tmp_path / "checkpoint-30.tmp").mkdir()  # not a checkpoint folder
    assert last_complete_checkpoint(str(tmp_path)) == complete  # by step, not by name (9 < 10 < 12)
    assert caplog.records == []
    truncated, missing = _checkpoint(tmp_path, 10, "truncated"), _checkpoint(tmp_path, 12, "missing")
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        assert last_complete_checkpoint(str(tmp_path)) == complete
    (message,) = [record.getMessage() for record in caplog.records]
    assert f"{missing} (its trainer_state.json is missing)" in message
    assert f"{truncated} (its trainer_state.json does not read as JSON" in message
    assert f"Resuming from {complete} instead" in message


def test_resuming_starts_over_when_no_checkpoint_is_complete(tmp_path, caplog):
    _checkpoint(tmp_path, 2, "missing")
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        assert last_complete_checkpoint(str(tmp_path)) is None
    assert "Resuming from the start (no complete checkpoint)" in caplog.text


def test_born_again_ensemble_joins_several_teachers_member_by_member(tmp_path):
    teachers = {"wide": tiny_bert(hidden=32, seed=1), "deep": tiny_bert(hidden=16, layers=3, seed=2)}
    generations = born_again(
        teachers,
        lambda generation: tiny_bert(hidden=16, seed=10 + generation),
        config(tmp_path, max_steps=1),
        generations=2,
        ensemble_last=True,
        train_dataset=classification_data(n=8),
    )
    assert list(summary(generations[1])["teachers"]) == ["wide", "deep", "generation1"]
    with pytest.raises(ValueError, match=r"the teachers \['generation1'\] have the same names"):
        born_again(
            {"generation1": teachers["wide"], "deep": teachers["deep"]},
            tiny_bert,
            config(tmp_path / "clash"),
            generations=2,
            ensemble_last=True,
            train_dataset=classification_data(n=8),
        )
    assert not (tmp_path / "clash").exists()
