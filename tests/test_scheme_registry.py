"""Schemes found by name: every registered scheme has a documented config dataclass, runs through ``run_scheme`` with
the same numbers as its function-style entry point, records its settings in ``distillation_config.json`` and on the
card, is parsed by the recipes' ``--scheme`` with ``HfArgumentParser``; a chain reuses a finished stage only under the
set-up it was trained with; a new scheme needs only its config and a registered run function."""

import dataclasses
import json

import pytest
import torch
from conftest import classification_data, config, tiny_bert
from transformers import BertForSequenceClassification

import hf_kd
from hf_kd.recipe_support.schemes import SchemeChoice, parse_recipe_args
from hf_kd.schemes import (
    BornAgainConfig,
    MutualLearningConfig,
    NoisyStudentConfig,
    SchemeConfig,
    SchemeResult,
    available_schemes,
    get_scheme,
    register_scheme,
    run_scheme,
)
from hf_kd.schemes import registry as scheme_registry
from hf_kd.schemes.born_again import born_again

SCHEMES = [
    "amalgamation",
    "born_again",
    "cross_modal",
    "graph",
    "mean_teacher",
    "mutual_learning",
    "noisy_student",
    "offline",
    "self_distillation",
    "teacher_assistant",
]


def test_every_scheme_is_registered_with_a_documented_config():
    assert available_schemes() == SCHEMES
    for name in SCHEMES:
        entry = get_scheme(name)
        assert entry.config.name == name and issubclass(entry.config, SchemeConfig)
        assert entry.description, name  # the recipes' --scheme help
        for field in dataclasses.fields(entry.config):
            assert field.metadata.get("help"), f"{name}.{field.name} has no help"
        assert entry.config().to_dict()["name"] == name  # the defaults construct and serialise


def test_the_package_exports_the_entry_point_configs_and_trainers():
    for name in ("run_scheme", "available_schemes", "BornAgainConfig", "MutualLearningTrainer", "SchemeResult"):
        assert name in hf_kd.__all__ and getattr(hf_kd, name) is not None


def _student(generation):
    return tiny_bert(hidden=16, seed=10 + generation)


def test_run_scheme_gives_the_function_entry_points_numbers_and_records_the_settings(tmp_path):
    teacher, data = tiny_bert(seed=1), classification_data(n=16)
    by_function = born_again(teacher, _student, config(tmp_path / "a", max_steps=2), generations=2, train_dataset=data)
    result = run_scheme(
        BornAgainConfig(generations=2),
        config(tmp_path / "b", max_steps=2),
        teacher=teacher,
        make_student=_student,
        train_dataset=data,
    )
    assert isinstance(result, SchemeResult) and [stage.name for stage in result.stages] == ["generation1"]
    for a, b in zip(by_function[-1].model.state_dict().values(), result.student.state_dict().values()):
        assert torch.equal(a, b)
    result.trainer.save_model(str(tmp_path / "b" / "final"))
    summary = json.loads((tmp_path / "b" / "final" / "distillation_config.json").read_text())
    assert summary["scheme"] == {"name": "born_again", "generations": 2, "ensemble_last": False}
    result.trainer.create_model_card(output_dir=str(tmp_path / "b" / "final"))
    card = (tmp_path / "b" / "final" / "README.md").read_text()
    assert "- Scheme: `born_again` (generations=2, ensemble_last=False)" in card


def test_run_scheme_refuses_teachers_a_scheme_does_not_take(tmp_path):
    args, data = config(tmp_path), classification_data(n=8)
    with pytest.raises(ValueError, match="scheme 'mutual_learning' trains its own teachers with the student"):
        run_scheme("mutual_learning", args, teacher=tiny_bert(), make_student=_student, train_dataset=data)
    with pytest.raises(ValueError, match="scheme 'teacher_assistant' starts from one teacher; got 2 teachers"):
        run_scheme(
            "teacher_assistant", args, teacher=[tiny_bert(), tiny_bert()], make_student=_student, train_dataset=data
        )
    with pytest.raises(ValueError, match="scheme 'born_again' distils from a teacher: give teacher="):
        run_scheme("born_again", args, make_student=_student, train_dataset=data)
    with pytest.raises(ValueError, match=r"unknown scheme 'born-again'\. Did you mean 'born_again'\?"):
        run_scheme("born-again", args, make_student=_student, train_dataset=data)


@dataclasses.dataclass
class _Recipe:
    steps: int = dataclasses.field(default=1, metadata={"help": "a recipe's own flag"})


def test_the_recipe_flags_are_the_chosen_schemes_config(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    recipe, choice, scheme, args = parse_recipe_args(
        _Recipe, hf_kd.DistillationConfig, [*out, "--scheme", "born_again", "--generations", "3"]
    )
    assert scheme == BornAgainConfig(generations=3) and choice.scheme == "born_again" and recipe.steps == 1
    _, _, scheme, _ = parse_recipe_args(
        _Recipe, hf_kd.DistillationConfig, [*out, "--scheme=mutual_learning", "--towards", "ensemble"]
    )
    assert scheme == MutualLearningConfig(towards="ensemble")
    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("scheme: noisy_student\nrounds: 2\npseudo_labels: hard\nreport_to: none\n")
    _, _, scheme, _ = parse_recipe_args(_Recipe, hf_kd.DistillationConfig, [*out, "--config", str(yaml_file)])
    assert scheme == NoisyStudentConfig(rounds=2, pseudo_labels="hard")
    with pytest.raises(ValueError, match=r"not used by the HfArgumentParser: \['--generations', '3'\]"):
        parse_recipe_args(_Recipe, hf_kd.DistillationConfig, [*out, "--scheme", "offline", "--generations", "3"])
    assert SchemeChoice().takes_teacher is not False  # offline distils from the recipe's teacher
    assert not SchemeChoice(scheme="mean_teacher").takes_teacher


def test_a_finished_stage_is_reused_only_under_the_set_up_it_was_trained_with(tmp_path):
    teacher, data = tiny_bert(seed=1), classification_data(n=16)
    first = born_again(teacher, _student, config(tmp_path, max_steps=2), generations=2, train_dataset=data)
    loads = []

    def load(folder):
        loads.append(folder)
        return BertForSequenceClassification.from_pretrained(folder)

    again = born_again(
        teacher, _student, config(tmp_path, max_steps=2), generations=2, train_dataset=data, load_student=load
    )
    assert len(loads) == 2 and all(stage.trainer is None for stage in again)  # read back, not trained
    assert torch.equal(next(iter(again[1].model.parameters())), next(iter(first[1].model.parameters())))
    loads.clear()  # one more generation: the two finished ones are read back, the third trains
    longer = born_again(
        teacher, _student, config(tmp_path, max_steps=2), generations=3, train_dataset=data, load_student=load
    )
    assert len(loads) == 2 and [stage.trainer is None for stage in longer] == [True, True, False]
    changed = config(tmp_path, max_steps=2, losses="kl:1,logit_mse:0.5")
    with pytest.raises(
        ValueError, match=r"stage 'generation1' finished in an earlier run .* under another set-up: losses"
    ):
        born_again(teacher, _student, changed, generations=2, train_dataset=data, load_student=load)
    with pytest.raises(ValueError, match=r"under another set-up: teacher: \{'class': 'BertForSequenceClassification'"):
        born_again(
            tiny_bert(hidden=16, seed=1),
            _student,
            config(tmp_path, max_steps=2),
            generations=2,
            train_dataset=data,
            load_student=load,
        )


def test_a_new_scheme_is_its_config_and_a_registered_function(tmp_path):
    @dataclasses.dataclass
    class TwiceConfig(SchemeConfig):
        repeats: int = dataclasses.field(default=2, metadata={"help": "how many offline runs in a row"})

    def run_twice(config_, args, given):
        """Twice: offline distillation repeated, each student the next one's teacher."""
        trainer, teacher = None, given.teacher
        for _ in range(config_.repeats):
            trainer = hf_kd.DistillationTrainer(given.make_student(1), teacher, args, **given.trainer_kwargs)
            trainer.scheme_config = config_
            trainer.train()
            teacher = trainer.student
        return SchemeResult(trainer, [])

    register_scheme("twice", config=TwiceConfig, teachers="one")(run_twice)
    try:
        assert "twice" in available_schemes()
        _, _, scheme, args = parse_recipe_args(
            _Recipe,
            hf_kd.DistillationConfig,
            [
                "--output_dir",
                str(tmp_path),
                "--scheme",
                "twice",
                "--repeats",
                "3",
                "--max_steps",
                "1",
                "--report_to",
                "none",
                "--use_cpu",
                "true",
            ],
        )
        result = run_scheme(
            scheme, args, teacher=tiny_bert(seed=1), make_student=_student, train_dataset=classification_data(n=8)
        )
        assert result.trainer.distillation_summary()["scheme"] == {"name": "twice", "repeats": 3}
    finally:
        del scheme_registry._SCHEMES["twice"]
