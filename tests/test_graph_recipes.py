"""The classification recipes' graph and amalgamation flags end to end on real digits, with a few steps:
``--scheme graph --graph FILE --graph_search N`` and ``--scheme amalgamation --teachers A,B``; every node and teacher
is a row of the results table. Also: a teacher over some classes is measured on the rows of its own classes."""

import json

import pytest
import torch
from conftest import tiny_bert
from datasets import ClassLabel, Dataset
from test_recipes import run_recipe
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from hf_kd.schemes.amalgamation import own_class_rows
from hf_kd.schemes.graph import DistillationGraph, GraphEdge

COMMON = ["--config", "recipes/configs/image_classification.yaml", "--max_steps", "4", "--logging_steps", "2"]


def saved_vit(folder, digits):
    """An (untrained) ViT over ``digits``, named by them, saved with the recipe's image processor."""
    torch.manual_seed(len(digits))
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=16, num_hidden_layers=1,
                       num_attention_heads=1, intermediate_size=32, num_labels=len(digits),
                       id2label={k: str(d) for k, d in enumerate(digits)},
                       label2id={str(d): k for k, d in enumerate(digits)})  # fmt: skip
    ViTForImageClassification(config).save_pretrained(folder)
    ViTImageProcessorPil(do_resize=False, rescale_factor=1 / 16, image_mean=[0.5], image_std=[0.5]).save_pretrained(
        folder
    )
    return str(folder)


@pytest.mark.slow
def test_image_recipe_runs_a_searched_graph_and_an_amalgamation(tmp_path):
    teacher = saved_vit(tmp_path / "teacher", list(range(10)))
    graph = DistillationGraph(
        {"teacher": "frozen", "student": "trained", "peer": "trained"},
        [GraphEdge("teacher", "student"), GraphEdge("peer", "student"), GraphEdge("student", "peer")],
        "student",
    )
    graph.save(str(tmp_path / "graph.yaml"))
    out = tmp_path / "graph"
    run_recipe("image_classification.py", *COMMON, "--output_dir", str(out), "--teacher", teacher,
               "--scheme", "graph", "--graph", str(tmp_path / "graph.yaml"), "--graph_search", "2",
               "--search_losses", "kl,jsd")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [name.split(" (")[0] for name in results] == [f"teacher {teacher}", "student from scratch", "peer",
                                                         "student distilled"]  # fmt: skip
    searched = DistillationGraph.load(str(out / "searched_graph.yaml"))
    summary = json.loads((out / "student" / "distillation_config.json").read_text())
    assert summary["stage"]["graph"] == searched.to_dict() and summary["scheme"]["graph_search"] == 2
    assert "graph searched on 216 held-out training images" in (out / "results.md").read_text()

    low, high = saved_vit(tmp_path / "low", [0, 1, 2, 3, 4, 5]), saved_vit(tmp_path / "high", [4, 5, 6, 7, 8, 9])
    out = tmp_path / "amalgamation"
    run_recipe("image_classification.py", *COMMON, "--output_dir", str(out), "--teachers", f"{low},{high}",
               "--scheme", "amalgamation")  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert [name.split(" (")[0] for name in results] == [
        f"teacher {low}, on the images of its own classes", f"teacher {high}, on the images of its own classes",
        "student from scratch", "student distilled",
    ]  # fmt: skip
    summary = json.loads((out / "student" / "distillation_config.json").read_text())
    assert summary["stage"]["teacher_classes"] == {"teacher0": [str(d) for d in range(6)],
                                                   "teacher1": [str(d) for d in range(4, 10)]}  # fmt: skip


def test_a_teacher_of_some_classes_is_measured_on_the_rows_of_its_own_classes():
    names = ["sport", "politics", "tech", "business"]
    rows = Dataset.from_dict({"x": list(range(6)), "labels": [0, 1, 2, 3, 2, 0]})
    rows = rows.cast_column("labels", ClassLabel(names=names)).with_format("torch")
    teacher = tiny_bert(num_labels=2)
    teacher.config.id2label, teacher.config.label2id = {0: "tech", 1: "sport"}, {"tech": 0, "sport": 1}
    own = own_class_rows(rows, teacher, names)[:]
    assert own["x"].tolist() == [0, 2, 4, 5] and own["labels"].tolist() == [1, 0, 0, 1]  # as torch tensors still
    teacher.config.id2label, teacher.config.label2id = {0: "weather", 1: "art"}, {"weather": 0, "art": 1}
    with pytest.raises(ValueError, match=r"the teacher's classes \['weather', 'art'\] are none of the dataset's"):
        own_class_rows(rows, teacher, names)
