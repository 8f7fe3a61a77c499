"""Federated distillation on Flower (hf_kd.federated): non-IID shards, the server's distillation step, and real
Flower simulations whose every message is inspected."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import config as distillation_args
from conftest import tiny_bert
from datasets import Dataset
from transformers import ResNetConfig, ResNetForImageClassification

from hf_kd import DistillationTrainer
from hf_kd.federated import (
    CONSENSUS,
    PUBLIC_LOGITS,
    REPORT,
    SETTINGS,
    WEIGHTS,
    FederatedConfig,
    _distil,
    _LogitEnsemble,
    average_weights,
    check_parties,
    check_shards,
    class_count_weights,
    class_counts,
    combine_logits,
    dirichlet_split,
    distil_on_public,
    predict,
    run_federated,
    train_locally,
    validation_rows,
)

CLASSES, SIDE = 4, 4


def resnet(seed: int, width: int = 8, depth: int = 1) -> ResNetForImageClassification:
    torch.manual_seed(seed)
    config = ResNetConfig(
        num_channels=1,
        embedding_size=8,
        hidden_sizes=[width, 2 * width],
        depths=[depth, depth],
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=CLASSES,
    )
    return ResNetForImageClassification(config)


def images(count: int, seed: int, labels: bool = True) -> Dataset:
    """Class c: quadrant c of a noisy 4×4 image is bright."""
    rng = np.random.default_rng(seed)
    classes = rng.integers(0, CLASSES, count)
    pixels = rng.normal(0, 0.3, (count, 1, SIDE, SIDE)).astype(np.float32)
    for row, cls in enumerate(classes):
        pixels[row, 0, 2 * (cls // 2) : 2 * (cls // 2) + 2, 2 * (cls % 2) : 2 * (cls % 2) + 2] += 2.0
    columns = {"pixel_values": pixels.tolist()}
    if labels:
        columns["labels"] = classes.tolist()
    return Dataset.from_dict(columns).with_format("torch")


def accuracy(model, rows: Dataset) -> float:
    logits = predict(model, rows)
    return float((logits.argmax(-1) == np.asarray(rows["labels"])).mean())


def test_dirichlet_shards_cover_every_row_once_and_small_alpha_is_skewed():
    labels = np.repeat(np.arange(5), 40)
    skewed, even = dirichlet_split(labels, 4, alpha=0.1, seed=0), dirichlet_split(labels, 4, alpha=100.0, seed=0)
    for shards in (skewed, even):
        assert sorted(row for shard in shards for row in shard) == list(range(200))

    def dominant_share(shards):  # the mean share of a client's most frequent class
        return np.mean([np.bincount(labels[shard]).max() / len(shard) for shard in shards])

    assert dominant_share(skewed) > 0.6 and dominant_share(even) < 0.35
    assert dirichlet_split(labels, 4, alpha=0.1, seed=0) == skewed  # seeded
    with pytest.raises(ValueError, match="200 rows cannot give 101 clients 2 rows each"):
        dirichlet_split(labels, 101, alpha=1.0)


def test_fedavg_weights_by_shard_size():
    states = [
        {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(1)},
        {"w": torch.tensor([3.0, 0.0]), "n": torch.tensor(2)},
    ]
    averaged = average_weights(states, [1, 2])
    assert torch.allclose(averaged["w"], torch.tensor([2.0, 4 / 3])) and averaged["n"].item() == 2


def test_min_rows_1_gives_every_client_a_row_and_a_client_without_rows_weighs_nothing():
    labels = np.repeat(np.arange(4), 5)
    shards = dirichlet_split(labels, 8, alpha=0.5, seed=0, min_rows=1)
    assert min(len(shard) for shard in shards) >= 1
    assert sorted(row for shard in shards for row in shard) == list(range(20))
    states = [{"w": torch.tensor([5.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}]
    assert average_weights(states, [0, 1, 3])["w"].item() == 2.5  # (1·1 + 3·3) / 4


def named(model, names):
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    return model


def test_the_parties_label_sets_are_compared_by_width_and_by_name_before_round_1():
    names = ["top-left", "top-right", "bottom-left", "bottom-right"]
    server = named(resnet(0), names)
    # The same names, or transformers' default LABEL_k (which name nothing), agree with the server's map.
    assert check_parties(lambda k: named(resnet(k), names) if k else resnet(k), server, 2, "feddf") == CLASSES
    swapped = names[:2][::-1] + names[2:]
    with pytest.raises(ValueError, match=r"client 1's id2label \{0: 'top-right', 1: 'top-left'"):
        check_parties(lambda k: named(resnet(k), swapped if k else names), server, 2, "fedmd")
    # fedmd: clients of other architectures are fine, other label sets are not; feddf needs the server's weights.
    heterogeneous = lambda k: resnet(k, width=8 + 4 * k, depth=1 + k)  # noqa: E731
    assert check_parties(heterogeneous, server, 2, "fedmd") == CLASSES
    with pytest.raises(ValueError, match="client 1's differs from the server's"):
        check_parties(heterogeneous, server, 2, "feddf")
    # A server whose config states no label set (a plain module): the first client is the reference.
    with pytest.raises(ValueError, match="client 1 predicts 3 classes .config.num_labels. and client 0 2"):
        check_parties(lambda k: tiny_bert(hidden=16, layers=1, num_labels=2 + k), torch.nn.Linear(2, 2), 2, "fedmd")
    check_shards([images(8, seed=0)], CLASSES)  # labels 0-3 of 4 classes
    with pytest.raises(ValueError, match=r"client 0's shard has labels \[3\] outside the 3 classes"):
        check_shards([images(8, seed=0)], 3)


def test_every_federated_refusal_comes_before_the_simulation_starts(monkeypatch, tmp_path):
    import flwr.simulation
    from refusals_federated import CASES

    def started(**_):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(flwr.simulation, "run_simulation", started)
    for case in CASES:
        with pytest.raises(case.error, match=None) as raised:
            case.run(tmp_path)
        assert case.says in str(raised.value), case.id


def test_the_feddf_server_step_equals_a_multi_teacher_run_on_the_client_models(tmp_path):
    clients = [resnet(seed) for seed in (1, 2, 3)]
    public = images(48, seed=4, labels=False)
    config = FederatedConfig(mode="feddf", server_steps=6, batch_size=8, temperature=2.0, seed=0)
    from_predictions = distil_on_public(
        resnet(0), public, [predict(client, public) for client in clients], 6, config, learning_rate=1e-2, seed=5
    )
    args = distillation_args(
        tmp_path,
        max_steps=6,
        learning_rate=1e-2,
        seed=5,
        losses="kl",
        temperature=2.0,
        hard_label_weight=1.0,  # the server's KL at weight 1
        teacher_aggregation="mean_logits",
    )
    live = resnet(0)
    DistillationTrainer(live, [copy.deepcopy(client) for client in clients], args, train_dataset=public).train()
    for (name, value), other in zip(from_predictions.state_dict().items(), live.state_dict().values()):
        assert torch.allclose(value, other, atol=1e-6), name
    untrained = resnet(0).state_dict()
    assert any(not torch.equal(value, untrained[name]) for name, value in live.state_dict().items())  # it trained


def test_the_server_validates_on_a_seeded_share_of_the_public_rows_the_same_every_round():
    distilled, held_out = validation_rows(10, 0.3, seed=7)
    order = np.random.default_rng(7).permutation(10)  # by hand: the first round(0.3 × 10) = 3 of a seeded draw
    assert held_out.tolist() == sorted(order[:3].tolist()) and distilled.tolist() == sorted(order[3:].tolist())
    assert validation_rows(10, 0.3, seed=7)[1].tolist() == held_out.tolist()
    with pytest.raises(ValueError, match=r"server_validation_fraction=0.1 of 4 public rows holds out 0: the server"):
        validation_rows(4, 0.1, seed=0)


def test_server_validation_keeps_the_best_checkpoint_and_patience_stops_the_distillation():
    clients = [resnet(seed) for seed in (1, 2, 3)]
    public = images(40, seed=4, labels=False)
    predictions = [predict(client, public) for client in clients]
    _, held_out = validation_rows(40, 0.25, seed=0)
    reports = {}
    for patience in (0, 1):
        config = FederatedConfig(
            server_steps=16,
            batch_size=8,
            temperature=2.0,
            server_validation_fraction=0.25,
            server_eval_steps=2,
            server_patience=patience,
        )
        model, reports[patience] = _distil(resnet(0), public, predictions, 16, config, 0.05, 5, 0.25)
        # By hand: τ² · KL(softmax(mean client logits / τ) ‖ softmax(server logits / τ)) on the held-out rows, mean
        # over rows — the returned model is the checkpoint of the best validation, not the last step's.
        teacher = torch.tensor(np.mean([logits[held_out] for logits in predictions], axis=0)) / 2
        student = torch.tensor(predict(model, public.select(held_out))) / 2
        by_hand = 4 * (teacher.softmax(-1) * (teacher.log_softmax(-1) - student.log_softmax(-1))).sum(-1).mean()
        assert reports[patience]["server_validation_loss"] == pytest.approx(by_hand.item(), rel=1e-4)
    # At lr 0.05 the validation loss is best after the first validation (step 2) and worse after: without patience
    # all 16 steps run and step 2's weights come back; with patience 1 it stops at the next validation.
    assert reports[0] == {**reports[0], "server_steps_run": 16, "server_best_step": 2}
    assert reports[1] == {**reports[0], "server_steps_run": 4}


def test_a_client_whose_last_batch_would_hold_one_row_trains_without_it():
    # 9 rows at batch 4: each epoch's last batch would hold 1 row, on which BatchNorm cannot train (ValueError);
    # it is dropped, so 2 epochs are 4 steps, not 6.
    shard, model = images(9, seed=3), resnet(0)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    train_locally(model, shard, 4, FederatedConfig(batch_size=4), seed=0)
    assert any(not torch.equal(value, before[name]) for name, value in model.state_dict().items())
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        resnet(0).train()(pixel_values=shard[:1]["pixel_values"])  # what the last batch did before


def test_the_ensemble_a_feddf_server_distils_from_averages_the_clients_logits():
    clients = [resnet(seed) for seed in (1, 2, 3)]
    rows = images(12, seed=4, labels=False)
    expected = np.mean([predict(client, rows) for client in clients], axis=0)  # AVGLOGITS: logits, not probabilities
    np.testing.assert_allclose(predict(_LogitEnsemble(clients), rows), expected, atol=1e-6)


def test_the_class_level_ensemble_weighs_each_client_by_its_share_of_each_class():
    # Client 0 holds 3 rows of class 0 and 1 of class 2, client 1 one row of class 0; nobody holds class 1.
    counts = class_counts(Dataset.from_dict({"labels": [0, 0, 2, 0, -100]}), 3)
    assert counts.tolist() == [3, 0, 1]  # the −100 row is not counted
    weights = class_count_weights([counts, [1, 0, 0]])
    # By hand: class 0 is 3 : 1, class 1 (no rows anywhere) 1/2 each, class 2 only client 0's.
    np.testing.assert_allclose(weights, [[0.75, 0.5, 1.0], [0.25, 0.5, 0.0]])
    logits = [np.array([[4.0, 1.0, 2.0]]), np.array([[0.0, 3.0, -6.0]])]
    np.testing.assert_allclose(combine_logits(logits, weights), [[3.0, 2.0, 2.0]])  # 0.75·4 + 0.25·0, …
    np.testing.assert_allclose(combine_logits(logits), [[2.0, 2.0, -2.0]])  # uniform: the mean
    clients, rows = [resnet(seed) for seed in (1, 2)], images(12, seed=4, labels=False)
    expected = combine_logits([predict(client, rows) for client in clients], weights[:, [0, 1, 2, 2]])
    ensemble = _LogitEnsemble(clients, weights[:, [0, 1, 2, 2]])  # (4 classes here)
    np.testing.assert_allclose(predict(ensemble, rows), expected, atol=1e-6)


def test_a_class_weighted_server_distils_from_the_weighted_ensemble(tmp_path):
    # The server taught by the clients with class weights trains exactly as one taught by their weighted logits.
    clients, public = [resnet(seed) for seed in (1, 2, 3)], images(32, seed=4, labels=False)
    predictions = [predict(client, public) for client in clients]
    weights = class_count_weights([[5, 0, 1, 2], [0, 4, 1, 2], [1, 1, 0, 2]])
    config = FederatedConfig(server_steps=4, batch_size=8, temperature=2.0)
    weighted = distil_on_public(resnet(0), public, predictions, 4, config, 1e-2, 5, class_weights=weights)
    combined = distil_on_public(resnet(0), public, [combine_logits(predictions, weights)], 4, config, 1e-2, 5)
    uniform = distil_on_public(resnet(0), public, predictions, 4, config, 1e-2, 5)
    for name, value in weighted.state_dict().items():
        assert torch.equal(value, combined.state_dict()[name]), name
    assert any(not torch.allclose(value, uniform.state_dict()[name]) for name, value in weighted.state_dict().items())


def _shards(count: int, alpha: float, seed: int) -> list[Dataset]:
    rows = images(240, seed=seed)
    return [rows.select(shard) for shard in dirichlet_split(np.asarray(rows["labels"]), count, alpha, seed=seed)]


@pytest.mark.parametrize("mode", ["feddf", "fedmd"])
def test_a_flower_simulation_of_3_clients_and_2_rounds_sends_no_raw_data(mode):
    shards = _shards(3, alpha=0.5, seed=0)
    public, test = images(64, seed=7, labels=False), images(96, seed=8)
    # fedmd: clients of different architectures (only predictions cross the wire)
    sizes = [(8, 1), (12, 1), (8, 2)] if mode == "fedmd" else [(8, 1)] * 3
    config = FederatedConfig(
        mode=mode,
        rounds=2,
        local_steps=15,
        server_steps=15,
        digest_steps=5,
        batch_size=16,
        learning_rate=1e-2,
        server_learning_rate=1e-2,
        # feddf: the server validates on 16 of the 64 public rows every 5 steps and stops after 2 without progress
        server_validation_fraction=0.25 if mode == "feddf" else 0.0,
        server_eval_steps=5,
        server_patience=2 if mode == "feddf" else 0,
        # fedmd: the class-level ensemble, for which clients also send their rows per class
        ensemble_weighting="class_counts" if mode == "fedmd" else "uniform",
    )
    result = run_federated(
        lambda k: resnet(10 + k, *sizes[k]),
        lambda: resnet(0),
        shards,
        public,
        config,
        evaluate=lambda model: {"accuracy": accuracy(model, test)},
        evaluate_ensemble=mode == "feddf",
        record_messages=True,
    )
    assert [entry["round"] for entry in result.history] == [1, 2]
    if mode == "feddf":
        for entry in result.history:
            assert 5 <= entry["server_best_step"] <= entry["server_steps_run"] <= 15
            assert entry["server_validation_loss"] >= 0 and 0 <= entry["ensemble_accuracy"] <= 1
    assert result.history[-1]["accuracy"] > 0.4  # 4 classes: chance is 0.25
    assert len(result.wire_log) == 2 * 2 * 3  # 3 messages each way per round
    private = [np.asarray(shard[:]["pixel_values"]) for shard in shards]
    for entry in result.wire_log:
        content = entry["content"]
        records = set(content.array_records) | set(content.config_records) | set(content.metric_records)
        if entry["direction"] == "to server":
            expected = {REPORT, PUBLIC_LOGITS} | ({WEIGHTS} if mode == "feddf" else set())
            assert records == expected
            if mode == "fedmd":  # the rows per class, counted as the client's shard holds them
                sized = [shard for shard in shards if len(shard) == content[REPORT]["num_examples"]]
                counted = [np.bincount(shard["labels"], minlength=CLASSES).tolist() for shard in sized]
                assert content[REPORT]["class_counts"] in counted
            assert set(content[REPORT]) == {"num_examples"} | ({"class_counts"} if mode == "fedmd" else set())
            logits = content[PUBLIC_LOGITS]["logits"].numpy()
            assert logits.shape == (len(public), CLASSES)
        else:
            allowed = {SETTINGS} | ({WEIGHTS} if mode == "feddf" else set())
            allowed |= {CONSENSUS} if mode == "fedmd" and entry["round"] > 1 else set()
            assert records == allowed and set(content[SETTINGS]) == {"round"}
        if WEIGHTS in content.array_records:
            assert set(content[WEIGHTS]) == set(resnet(0).state_dict())
        for record in content.array_records.values():
            for array in record.values():
                values = array.numpy()
                assert values.dtype.kind in "fi"  # (BatchNorm counts its batches in an integer buffer)
                for shard in private:  # no array is (a piece of) a client's rows
                    assert values.shape[-2:] != shard.shape[-2:] or not np.isin(shard, values).any()


def test_the_federated_recipe_compares_every_mode_with_local_and_central_training(tmp_path):
    from test_recipes import run_recipe

    output = run_recipe(
        "federated.py",
        *("--config", "recipes/configs/federated.yaml", "--output_dir", str(tmp_path), "--modes", "fedmd"),
        *("--alphas", "0.5", "--num_clients", "3", "--rounds", "2", "--local_steps", "2", "--server_steps", "2"),
        *("--digest_steps", "1", "--width", "8", "--server_eval_steps", "1"),
    )
    assert "rounds_to_target" in output
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == [
        "α=0.5: each client alone (mean of 3)",
        "α=0.5: fedmd",
        "centralised (every client's rows in one place)",
    ]
    assert all(0 <= row["accuracy"] <= 1 for row in results.values())
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert list(curves) == ["0.5/fedmd"] and len(curves["0.5/fedmd"]) == 2
    assert results["α=0.5: fedmd"]["accuracy"] == curves["0.5/fedmd"][-1]
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "results.svg").exists()
