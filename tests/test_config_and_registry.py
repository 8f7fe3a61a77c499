"""DistillationConfig validation, the command line / YAML forms, and the loss registry."""

import importlib
import json
import os
import sys

import pytest
import torch
from conftest import ROOT, config, tiny_bert

from hf_kd import DistillationConfig, DistillationLoss, ModelFeatures, available_losses, get_loss
from hf_kd.config import LossSpec, parse_losses
from hf_kd.losses.registry import with_default_temperature
from hf_kd.recipe_support.cli import parse_args
from hf_kd.sentence_embeddings import SentenceEmbeddingModel
from hf_kd.teachers import LiveTeacher

ALL_IDS = """at attention_kl attention_mse class_balance crd dkd embedding_cosine embedding_mse fsp hidden_cosine
    hidden_mse hint infonce irg jsd kl listwise_kl logit_mse margin_mse pkd pkt prob_mse regression_mse reverse_kl
    rkd_angle rkd_distance skew_kl skew_reverse_kl soft_ce sp teacher_bounded tvd uhc uld vid""".split()
RESPONSE_IDS = [
    "dkd",
    "jsd",
    "kl",
    "logit_mse",
    "prob_mse",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "soft_ce",
    "tvd",
    "uhc",
    "uld",
]


class HalfKL(DistillationLoss):
    """A user's own loss, reachable by its dotted path."""

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student, teacher, mask=None, labels=None):
        return 0.5 * get_loss("kl", temperature=self.temperature)(student, teacher, mask, labels)


def test_available_losses_lists_every_family():
    assert set(RESPONSE_IDS) <= set(available_losses())
    assert available_losses() == ALL_IDS
    assert available_losses() == sorted(available_losses())


def _features(model, inputs, loss, side):
    from hf_kd.features import run_model

    return run_model(model, inputs, loss.side_needs(side))[1]


@pytest.mark.parametrize("name", available_losses())
def test_every_registered_loss_builds_with_defaults_and_backpropagates(name):
    # Real features of two BERTs of equal width but different depth and head count (widths differ in the
    # per-family tests, which set projectors).
    student_model, teacher_model = tiny_bert(layers=2, heads=2, seed=1), tiny_bert(layers=3, heads=4, seed=2)
    for model in (student_model, teacher_model):
        model.set_attn_implementation("eager")
    if name.startswith("embedding_"):  # sentence embeddings: the encoders under the heads, mean-pooled
        student_model, teacher_model = (
            SentenceEmbeddingModel(student_model.bert),
            SentenceEmbeddingModel(teacher_model.bert),
        )
    inputs = {"input_ids": torch.randint(0, 64, (6, 7)), "attention_mask": torch.ones(6, 7, dtype=torch.long)}
    inputs["attention_mask"][0, 5:] = 0
    loss = get_loss(name, **with_default_temperature(LossSpec(name), 2.0))
    # The teacher's weights could take gradients (requires_grad); the trainer's teacher path must give them none.
    assert all(p.requires_grad for p in teacher_model.parameters())
    teacher = LiveTeacher(teacher_model)(inputs, loss.side_needs("teacher"))
    student = _features(student_model, inputs, loss, "student")
    loss.setup(student, teacher, num_samples=10)
    # teacher_bounded reads regression targets (here 3 outputs per example), the others class ids, and
    # margin_mse relevance grades per candidate (the three logits as a query's candidates).
    labels = torch.randn(6, 3) if name == "teacher_bounded" else torch.tensor([0, 1, 2, 0, 1, 2])
    labels = torch.eye(3, dtype=torch.long)[labels] if name == "margin_mse" else labels
    labels = labels.masked_fill(torch.arange(6) % 2 == 0, -100) if name == "class_balance" else labels  # reads these
    value = loss(student, teacher, labels=labels, sample_index=torch.arange(6))
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student_model.parameters())
    assert all(p.grad is None for p in teacher_model.parameters())
    assert all(p.grad is not None for p in loss.parameters())  # learned parts train too


def test_unknown_loss_lists_valid_ids():
    with pytest.raises(ValueError, match="unknown loss 'kll'.*Valid ids: at, attention_kl, .*, kl, .*, vid;"):
        get_loss("kll")


def test_unknown_loss_option_lists_accepted_ones():
    with pytest.raises(
        ValueError,
        match=r"unknown option 'betta'; it accepts \['temperature', 'beta', 'confidence_threshold'\]. Did you mean 'be",
    ):
        get_loss("jsd", betta=0.3)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        ({"name": "attention_kl", "sink_keys": -1}, "attention_kl: sink_keys must be a non-negative integer"),
        ({"name": "hidden_mse", "layer_map": "middle"}, "hidden_mse: layer_map must be 'uniform', 'last' or a list"),
        ({"name": "hidden_mse", "layer_map": [[1]]}, r"hidden_mse: layer_map entries are .* got \[1\]"),
        ({"name": "hidden_mse", "layer_map": []}, "hidden_mse: layer_map is empty"),
        ({"name": "hidden_mse", "projector": "lin"}, r"hidden_mse: projector must be one of \('linear'"),
        ({"name": "crd", "pooling": "max"}, r"crd: pooling must be one of \('auto'"),
        ({"name": "embedding_cosine", "source": "hidden_states:last"}, "embedding_cosine: feature source must be"),
    ],
)
def test_a_bad_option_value_is_refused_when_the_config_is_made(tmp_path, loss, message):
    # the loss is built once in the config's validation: the command line's parse fails, not the trainer's set-up
    with pytest.raises(ValueError, match=f"^losses: {message}"):
        config(tmp_path, losses=[loss])


def test_dotted_path_to_own_loss():
    loss = get_loss("test_config_and_registry.HalfKL", temperature=2.0)
    features = ModelFeatures(logits=torch.randn(3, 4)), ModelFeatures(logits=torch.randn(3, 4))
    expected = 0.5 * get_loss("kl", temperature=2.0)(*features)
    assert loss(*features).item() == pytest.approx(expected.item())
    with pytest.raises(ValueError, match="cannot import loss class 'test_config_and_registry.Half'.*no attribute"):
        get_loss("test_config_and_registry.Half")
    with pytest.raises(ValueError, match="'json.JSONDecoder' is not a subclass of hf_kd.losses.DistillationLoss"):
        get_loss("json.JSONDecoder")


def _loss_module(folder, name):
    """A user's loss module on sys.path whose import leaves a mark (its top-level code ran)."""
    (folder / f"{name}.py").write_text(
        "import os\n"
        "from hf_kd.losses import DistillationLoss\n\n"
        "os.environ['IMPORTED_' + __name__.upper()] = '1'\n\n\n"
        "class Zero(DistillationLoss):\n"
        "    default_weight = 0.25\n\n"
        "    def forward(self, student, teacher, mask=None, labels=None):\n"
        "        return student.logits.sum() * 0\n"
    )
    return f"{name}.Zero"


def test_a_dotted_loss_path_imports_nothing_unless_asked(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _loss_module(tmp_path, "unasked_loss")
    for losses in (path, f"{path}:0.5", [{"name": path, "weight": 1.0}]):
        with pytest.raises(ValueError, match="names the module 'unasked_loss', which is not imported") as raised:
            config(tmp_path, losses=losses)
        assert "import unasked_loss" in str(raised.value) and "trust_loss_imports=True" in str(raised.value)
    assert "unasked_loss" not in sys.modules and "IMPORTED_UNASKED_LOSS" not in os.environ
    with pytest.raises(ValueError, match="cannot import loss class 'no_such_module.Loss'"):
        config(tmp_path, losses="no_such_module.Loss", trust_loss_imports=True)


def test_a_dotted_loss_path_resolves_in_a_module_the_user_imported(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _loss_module(tmp_path, "imported_loss")
    importlib.import_module("imported_loss")  # the user's own code imports it
    args = config(tmp_path, losses=path)  # no opt-in needed
    assert args.losses == [{"name": path, "weight": 0.25}]  # the class's default weight: the class was found
    assert type(get_loss(path)).__module__ == "imported_loss"
    # a class without an __init__ of its own takes no option, so the trainer-wide temperature is not passed to it
    # (nn.Module's __init__ would refuse it), and an option given is refused by name
    assert with_default_temperature(args.loss_specs[0], 2.0) == {}
    with pytest.raises(ValueError, match=r"got unknown option 'temperature'; it accepts \[\]"):
        config(tmp_path, losses=[{"name": path, "temperature": 2.0}])


def test_trust_loss_imports_imports_from_python_yaml_and_the_command_line(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    for source in ("python", "yaml", "command_line"):
        path = _loss_module(tmp_path, f"trusted_{source}")
        if source == "python":
            args = config(tmp_path, losses=path, trust_loss_imports=True)
        elif source == "yaml":
            recipe = tmp_path / "recipe.yaml"
            recipe.write_text(f"output_dir: {tmp_path}\nuse_cpu: true\ntrust_loss_imports: true\nlosses: {path}:0.5\n")
            (args,) = parse_args([DistillationConfig], ["--config", str(recipe)])
        else:
            flags = ["--output_dir", str(tmp_path), "--use_cpu", "--losses", path, "--trust_loss_imports"]
            (args,) = parse_args([DistillationConfig], flags)
        assert args.trust_loss_imports is True
        assert os.environ.pop(f"IMPORTED_TRUSTED_{source.upper()}") == "1"
        assert args.loss_specs[0].name == path and type(get_loss(path)).__name__ == "Zero"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, [{"name": "kl", "weight": 1.0}]),
        ("kl:1.0,logit_mse:0.5", [{"name": "kl", "weight": 1.0}, {"name": "logit_mse", "weight": 0.5}]),
        ("jsd:0.5:beta=0.9", [{"name": "jsd", "weight": 0.5, "beta": 0.9}]),
        ('[{"name": "dkd", "weight": 2, "beta": 4}]', [{"name": "dkd", "weight": 2.0, "beta": 4}]),
        (
            ["kl", {"name": "tvd", "kwargs": {"temperature": 1.0}}],
            [{"name": "kl", "weight": 1.0}, {"name": "tvd", "weight": 1.0, "temperature": 1.0}],
        ),
    ],
)
def test_loss_forms(value, expected):
    assert [spec.to_dict() for spec in parse_losses(value)] == expected


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"losses": "kl,kll"}, "unknown loss 'kll'.*Valid ids"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": -1.0}, "temperature must be a finite number > 0"),
        ({"losses": "kl:-1"}, "weight of 'kl' must be a finite number >= 0"),
        ({"alpha": 1.5}, r"alpha must lie in \[0, 1\]"),
        ({"alpha": 0.5, "hard_label_weight": 1.0}, "either alpha .* or hard_label_weight"),
        ({"hard_label_weight": -0.1}, "hard_label_weight must be a finite number >= 0"),
        ({"teacher_dtype": "int8"}, "teacher_dtype must be one of"),
        ({"losses": "kl:abc"}, "neither a weight nor key=value"),
        ({"losses": [{"weight": 1.0}]}, "needs a 'name'"),
    ],
)
def test_bad_configs_raise_naming_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config(tmp_path, **overrides)


def test_weights_of_both_forms(tmp_path):
    unset = config(tmp_path)  # the default mix is convex at DEFAULT_ALPHA = 0.9 (benchmarks/defaults_sweep.py)
    assert unset.alpha is None and unset.hard_label_weight is None
    assert (unset.label_loss_weight, unset.distillation_weight) == pytest.approx((0.1, 0.9))
    additive = config(tmp_path, hard_label_weight=1.0)
    assert (additive.label_loss_weight, additive.distillation_weight) == (1.0, 1.0)
    convex = config(tmp_path, alpha=0.3)
    assert (convex.label_loss_weight, convex.distillation_weight) == pytest.approx((0.7, 0.3))
    gamma = config(tmp_path, hard_label_weight=0.2)
    assert (gamma.label_loss_weight, gamma.distillation_weight) == (0.2, 1.0)


def test_command_line_and_yaml(tmp_path):
    (args,) = parse_args(
        [DistillationConfig],
        [
            "--output_dir",
            str(tmp_path),
            "--losses",
            "kl:1.0,jsd:0.5:beta=0.9",
            "--temperature",
            "3",
            "--alpha",
            "0.4",
            "--use_cpu",
        ],
    )
    assert args.losses == [{"name": "kl", "weight": 1.0}, {"name": "jsd", "weight": 0.5, "beta": 0.9}]
    assert (args.temperature, args.alpha) == (3.0, 0.4)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"output_dir: {tmp_path}\nuse_cpu: true\ntemperature: 4.0\n"
        "losses:\n  - {name: kl, weight: 0.5}\n  - {name: dkd, weight: 1.0, beta: 2.0}\n"
    )
    (args,) = parse_args([DistillationConfig], ["--config", str(recipe), "--temperature", "5"])
    assert args.temperature == 5.0  # the command line wins over the file
    assert args.losses == [{"name": "kl", "weight": 0.5}, {"name": "dkd", "weight": 1.0, "beta": 2.0}]
    recipe.write_text("tempreature: 4.0\n")
    with pytest.raises(SystemExit, match="unknown field"):
        parse_args([DistillationConfig], ["--config", str(recipe)])


def test_config_serialises(tmp_path):
    args = config(tmp_path, losses="kl:1.0,dkd:0.5:beta=4")
    assert '"beta": 4' in args.to_json_string()


def test_recipes_with_baselines_refuse_deepspeed_and_fsdp_with_a_way_out(monkeypatch):
    from types import SimpleNamespace

    from hf_kd.recipe_support.cli import refuse_engines_for_multi_model_recipes

    for variable in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(variable, raising=False)
    refuse_engines_for_multi_model_recipes(SimpleNamespace(deepspeed=None, fsdp=None))  # one device / DDP: fine
    with pytest.raises(SystemExit, match="which DeepSpeed does not support; distil only with --baselines false"):
        refuse_engines_for_multi_model_recipes(SimpleNamespace(deepspeed="recipes/accelerate/ds_zero3.json"))
    with pytest.raises(SystemExit, match="which FSDP does not support"):
        refuse_engines_for_multi_model_recipes(SimpleNamespace(deepspeed=None, fsdp=True))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what accelerate launch --config_file fsdp2.yaml sets
    with pytest.raises(SystemExit, match="DistillationTrainer under FSDP"):
        refuse_engines_for_multi_model_recipes(SimpleNamespace(deepspeed=None, fsdp=None))
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SystemExit, match="DistillationTrainer under DeepSpeed"):
        refuse_engines_for_multi_model_recipes(SimpleNamespace(deepspeed=None, fsdp=None))


def test_shipped_accelerate_configs_load_with_the_engines_the_readme_names():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    folder = os.path.join(ROOT, "recipes", "accelerate")
    expected = {
        "single_device.yaml": DistributedType.NO,
        "ddp.yaml": DistributedType.MULTI_GPU,
        "zero2.yaml": DistributedType.DEEPSPEED,
        "zero3.yaml": DistributedType.DEEPSPEED,
        "fsdp2.yaml": DistributedType.FSDP,
    }
    assert {name for name in os.listdir(folder) if name.endswith(".yaml")} == set(expected)
    for name, engine in expected.items():
        config = load_config_from_file(os.path.join(folder, name))
        assert config.distributed_type == engine, name
        if engine == DistributedType.DEEPSPEED:
            with open(os.path.join(ROOT, config.deepspeed_config["deepspeed_config_file"])) as handle:
                assert json.load(handle)["zero_optimization"]["stage"] == int(name[4]), name
        if engine == DistributedType.FSDP:
            assert config.fsdp_config["fsdp_version"] == 2
