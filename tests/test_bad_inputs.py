"""Every input hf_kd refuses, and every case that once gave a silent wrong result, with the outcome it must give.

One table (``CASES``): what a user did, and either the error it must raise (type and a phrase of its message) or a
check of the correct result. A refusal must leave nothing in the output folder that could pass for a result. The
docs page "What hf_kd refuses" (``docs/refusals.md``) is generated from the refusals here and in ``tests/refusals_*.py``
when the site is built (``docs/hooks/hf_kd_docs.py``), one section per file; ``test_the_docs_list_every_refusal``
checks that it lists exactly these rows. ``python tests/test_bad_inputs.py`` prints the rows as one table, without
building the site.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pathlib
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    ROOT,
    VOCAB,
    classification_data,
    config,
    grouped_query_lm_config,
    launch,
    lm_data,
    push_to_local_hub,
    tiny_bert,
    tiny_gpt2,
)
from datasets import Dataset
from refusal_cases import Case, area_cases

from hf_kd import DistillationConfig, DistillationTrainer, TeacherCache, get_loss, write_teacher_cache
from hf_kd.data import add_sample_index
from hf_kd.features import ModelFeatures
from hf_kd.federated import FederatedConfig, dirichlet_split, run_federated
from hf_kd.metrics import retrieval_metrics
from hf_kd.ranking import CrossEncoderRanker, RankingCollator
from hf_kd.recipe_support.schemes import SchemeChoice, parse_recipe_args
from hf_kd.schemes.cross_modal import check_views, paired_views
from hf_kd.schemes.mean_teacher import EMATeacher
from hf_kd.schemes.mutual_learning import MutualLearningTrainer
from hf_kd.schemes.self_distillation import EarlyExitModel, SelfDistillationConfig, SelfDistillationTrainer
from hf_kd.sentence_embeddings import SentenceEmbeddingModel
from hf_kd.token_classification import add_teacher_words, tokenize_words
from hf_kd.views import ViewCollator, pad_rows


def trainer(tmp_path, student=None, teacher=None, data=None, student_noise=None, processing_class=None, **overrides):
    return DistillationTrainer(
        model=student if student is not None else tiny_bert(hidden=16, seed=2),
        teacher_model=teacher if teacher is not None else tiny_bert(seed=1),
        args=config(tmp_path / "out", **overrides),
        train_dataset=data if data is not None else classification_data(),
        student_noise=student_noise,
        processing_class=processing_class,
    )


def nan_model(model, module="classifier"):
    getattr(model, module).bias.data.fill_(float("nan"))
    return model


def produced_result(folder) -> list[str]:
    """Files in ``folder`` that could pass for a trained student: weights, cards, checkpoints, configs."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        name
        for name in os.listdir(folder)
        if name.endswith((".safetensors", ".bin"))
        or name.startswith("checkpoint-")
        or name in ("README.md", "distillation_config.json", "config.json")
    )


# ---- cases whose correct outcome is a value ---------------------------------------------------------------------


def _train_on_nan_teacher(tmp_path, losses):
    student = tiny_bert(hidden=16, seed=2)
    before = {name: p.detach().clone() for name, p in student.named_parameters()}
    run = trainer(tmp_path, student, nan_model(tiny_bert(seed=1)), losses=losses, save_strategy="steps", save_steps=1)
    try:
        run.train()
    finally:  # the error stopped the first step before its update: the weights are untouched and finite
        assert all(torch.equal(before[name], p) for name, p in student.named_parameters())


def _labels_all_ignored(tmp_path):
    data = lm_data(n=8)
    data = data.remove_columns("labels").add_column("labels", [[-100] * 10] * 8)
    trainer(tmp_path, tiny_gpt2(hidden=16, seed=2), tiny_gpt2(seed=1), data).train()


def _smoothed_ce(tmp_path):
    run = trainer(tmp_path, label_smoothing_factor=0.2, losses="kl:0")
    batch = run._prepare_inputs(next(iter(run.get_train_dataloader())))
    run.compute_loss(run.model, batch)
    logged = run.term_log.reduce("train")["ce"]
    with torch.no_grad():
        log_p = run.model(**{k: v for k, v in batch.items() if k != "labels"}).logits.log_softmax(-1)
    nll = -log_p.gather(1, batch["labels"][:, None]).mean()
    uniform = -log_p.mean()
    return logged, (0.8 * nll + 0.2 * uniform).item()


def _eval_terms(tmp_path):
    data = classification_data(n=16)
    run = trainer(tmp_path, data=data)
    run.eval_dataset = data
    first = run.evaluate()
    predicted = run.predict(data).metrics
    again = run.evaluate()
    other = classification_data(n=16, seed=5)
    both = run.evaluate({"a": data, "b": other})
    alone_b = run.evaluate(other, metric_key_prefix="b")
    unlabeled = run.evaluate(data.remove_columns("labels"), metric_key_prefix="transfer")
    return first, predicted, again, both, alone_b, unlabeled


def _check_eval_terms(result, tmp_path):
    first, predicted, again, both, alone_b, unlabeled = result
    assert again["eval_kl"] == first["eval_kl"]  # predict() leaves nothing queued for the next evaluate()
    assert predicted["test_kl"] == first["eval_kl"]
    assert both["eval_a_kl"] == first["eval_kl"] and both["eval_b_kl"] == alone_b["b_kl"]
    assert both["eval_a_kl"] != both["eval_b_kl"]
    assert unlabeled["transfer_kl"] == first["eval_kl"] and "transfer_ce" not in unlabeled


def _card_language_first(tmp_path):
    run = trainer(tmp_path)
    run.create_model_card("en", "apache-2.0")
    return (tmp_path / "out" / "README.md").read_text()


def _token_classifier_transfer_rows(tmp_path):
    from transformers import BertConfig, BertForTokenClassification

    def tagger(seed, hidden):
        torch.manual_seed(seed)
        return BertForTokenClassification(
            BertConfig(
                vocab_size=VOCAB,
                hidden_size=hidden,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=2 * hidden,
                num_labels=5,
                hidden_dropout_prob=0.0,
            )
        )

    data = Dataset.from_dict(
        {
            "input_ids": torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(0)).tolist(),
            "attention_mask": [[1] * 6, [1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]],
            "labels": [[-100] * 6] * 4,  # a transfer set: no gold tags
        }
    )
    run = trainer(tmp_path, tagger(2, 16), tagger(1, 32), data, per_device_train_batch_size=4)
    batch = run._prepare_inputs(next(iter(run.get_train_dataloader())))
    counts = run._get_num_items_in_batch([batch], run.args.device)
    run.compute_loss(run.model, batch, num_items_in_batch=counts)
    return counts, run.term_log.reduce("train")


def _llava_pair():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    def llava(seed):
        torch.manual_seed(seed)
        vision = CLIPVisionConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=8,
            patch_size=4,
            projection_dim=16,
        )
        text = grouped_query_lm_config(LlamaConfig, hidden=16, layers=1)
        return LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63))

    return llava(2), llava(1)


def _vision_language_shift(tmp_path):
    student, teacher = _llava_pair()
    data = lm_data(n=4)
    run = trainer(tmp_path, student, teacher, data, per_device_train_batch_size=4, losses="kl", hard_label_weight=0)
    batch = run._prepare_inputs(next(iter(run.get_train_dataloader())))
    run.compute_loss(run.model, batch)
    with torch.no_grad():
        plain = {k: v for k, v in batch.items() if k != "labels"}
        s, t = student(**plain).logits[:, :-1], teacher(**plain).logits[:, :-1]  # position t predicts token t + 1
    mask = batch["labels"][:, 1:].ne(-100)
    expected = get_loss("kl", temperature=2.0)(ModelFeatures(logits=s), ModelFeatures(logits=t), mask=mask)
    return run.shift_labels, run.term_log.reduce("train")["kl"], expected.item() / mask.sum().item()


def _cache_and_damage(tmp_path, damage):
    data = lm_data(n=12)
    teacher = tiny_gpt2(seed=1)
    whole = write_teacher_cache(teacher, data, str(tmp_path / "whole"), top_k=4, shard_size=4)
    folder = tmp_path / "cache"
    write_teacher_cache(teacher, data, str(folder), top_k=4, shard_size=4)
    damage(folder / "shard-00001.safetensors")
    return whole, folder, teacher, data


def _rewrite_damaged_shard(tmp_path, damage):
    whole, folder, teacher, data = _cache_and_damage(tmp_path, damage)
    repaired = write_teacher_cache(teacher, data, str(folder), top_k=4, shard_size=4)
    return whole.manifest["shards"], repaired.manifest["shards"], TeacherCache.load(str(folder)).manifest["shards"]


def _check_repaired(result, tmp_path):
    whole, repaired, reloaded = result
    assert repaired == whole == reloaded  # same files, same checksums as an unbroken run


def _flip_last_byte(path):
    path.write_bytes(path.read_bytes()[:-1] + bytes([path.read_bytes()[-1] ^ 0xFF]))


def _open_garbage_shard_unverified(tmp_path):
    _, folder, _, _ = _cache_and_damage(tmp_path, lambda path: path.write_bytes(b"not a safetensors file"))
    TeacherCache.load(str(folder), verify_checksums=False)


def _cache_with_changed_attention_mask(tmp_path):
    data = add_sample_index(lm_data(n=8))
    cache = write_teacher_cache(tiny_gpt2(seed=1), data, str(tmp_path / "cache"), top_k=4)
    masks = [row[:-1] + [0] for row in data["attention_mask"]]  # same token ids, the last token now padding
    changed = data.remove_columns("attention_mask").add_column("attention_mask", masks)
    trainer(tmp_path, tiny_gpt2(hidden=16, seed=2), cache, changed)


def _push(tmp_path, *flags):
    return push_to_local_hub(tmp_path, "push_worker.py", *flags)


def _check_pushed_checkpoints(state, tmp_path):
    files = [path for commit in state.commits for path in commit["files"]]
    assert "last-checkpoint/hf_kd_losses.safetensors" in files  # a run resumed from the Hub finds its projector
    assert "last-checkpoint/hf_kd_run_setup.json" in files  # and the set-up it compares on resuming
    assert "last-checkpoint/optimizer.pt" in files and "model.safetensors" in files
    assert not any(path.endswith("training_args.bin") for path in files)  # no pickle in any upload
    assert not any(path in ("optimizer.pt", "hf_kd_losses.safetensors", "hf_kd_run_setup.json") for path in files)


CASES = [
    # ---- configuration ----
    Case(
        "weight-nan",
        '`losses="kl:nan"`',
        lambda p: config(p, losses="kl:nan"),
        ValueError,
        "weight of 'kl' must be a finite number >= 0",
    ),
    Case(
        "temperature-inf",
        "`temperature=inf`",
        lambda p: config(p, temperature=math.inf),
        ValueError,
        "temperature must be a finite number > 0",
    ),
    Case(
        "option-inf",
        '`losses="kl:1:temperature=.inf"`',
        lambda p: config(p, losses="kl:1:temperature=.inf"),
        ValueError,
        "option temperature=inf of loss 'kl' is not a finite number",
    ),
    Case("alpha-nan", "`alpha=nan`", lambda p: config(p, alpha=math.nan), ValueError, "alpha must lie in [0, 1]"),
    Case("losses-empty", '`losses=""`', lambda p: config(p, losses=""), ValueError, "losses is empty"),
    Case(
        "option-typo",
        '`losses="kl:1.0:temprature=2"`',
        lambda p: config(p, losses="kl:1.0:temprature=2"),
        ValueError,
        "unknown option 'temprature'",
    ),
    Case(
        "option-not-taken",
        '`losses="hidden_mse:1:temperature=2"` (takes no temperature)',
        lambda p: config(p, losses="hidden_mse:1:temperature=2"),
        ValueError,
        "got unknown option 'temperature'",
    ),
    Case(
        "option-value-bad",
        '`losses="attention_kl:1:sink_keys=-1"` (a bad option value: refused when the config is made)',
        lambda p: config(p, losses="attention_kl:1:sink_keys=-1"),
        ValueError,
        "losses: attention_kl: sink_keys must be a non-negative integer",
    ),
    Case(
        "option-layer-map-bad",
        '`losses="hidden_mse:1:layer_map=middle"`',
        lambda p: config(p, losses="hidden_mse:1:layer_map=middle"),
        ValueError,
        "losses: hidden_mse: layer_map must be 'uniform', 'last' or a list",
    ),
    Case(
        "json-broken",
        '`losses=\'[{"name": "kl",\'` (broken JSON)',
        lambda p: config(p, losses='[{"name": "kl",'),
        ValueError,
        "looks like a JSON list but does not parse",
    ),
    Case(
        "smoothing-chunked",
        "`label_smoothing_factor=0.1` with `chunk_size`",
        lambda p: config(p, label_smoothing_factor=0.1, chunk_size=8),
        ValueError,
        "is not applied on the chunk_size path",
    ),
    # ---- models and data, refused when the trainer is built ----
    Case(
        "label-sets",
        "student with 3 classes, teacher with 5",
        lambda p: trainer(p, tiny_bert(num_labels=3), tiny_bert(num_labels=5)),
        ValueError,
        "the student predicts 3 classes (config.num_labels) and the teacher 5",
    ),
    Case(
        "one-logit",
        "`kl` on a one-logit head (`num_labels=1`)",
        lambda p: trainer(p, tiny_bert(num_labels=1), tiny_bert(num_labels=1, seed=1)),
        ValueError,
        "one-logit head",
    ),
    Case(
        "relation-batch-1",
        "`sp` at `per_device_train_batch_size=1`",
        lambda p: trainer(p, losses="sp", per_device_train_batch_size=1),
        ValueError,
        "identically 0 below 2 examples per process",
    ),
    Case(
        "distance-batch-2",
        "`rkd_distance` at `per_device_train_batch_size=2`",
        lambda p: trainer(p, losses="rkd_distance", per_device_train_batch_size=2),
        ValueError,
        "identically 0 below 3 examples per process",
    ),
    Case(
        "angle-batch-2",
        "`rkd_angle` at `per_device_train_batch_size=2`",
        lambda p: trainer(p, losses="rkd_angle", per_device_train_batch_size=2),
        ValueError,
        "identically 0 below 3 examples per process",
    ),
    Case(
        "crd-no-index",
        "`crd` on a training set without `sample_index`",
        lambda p: trainer(p, losses="crd"),
        ValueError,
        "add a sample_index column",
    ),
    Case(
        "teacher-path",
        'teacher `"./no/such/teacher"`',
        lambda p: trainer(p, teacher="./no/such/teacher"),
        FileNotFoundError,
        "is not a folder",
    ),
    Case(
        "teacher-meta",
        "a teacher built on the meta device",
        lambda p: trainer(p, teacher=_on_meta_device(tiny_bert)),
        ValueError,
        "on the meta device",
    ),
    Case(
        "empty-train",
        "an empty `train_dataset`",
        lambda p: trainer(p, data=classification_data().select([])),
        ValueError,
        "train_dataset is empty",
    ),
    Case(
        "own-teacher",
        "the student passed as its own teacher",
        lambda p: _own_teacher(p),
        ValueError,
        "teacher_model is the student itself",
    ),
    Case(
        "hub-unreachable",
        "`push_to_hub=True` with the Hub unreachable",
        lambda p: trainer(p, push_to_hub=True, hub_model_id="alice/x"),
        RuntimeError,
        "push_to_hub=True creates the Hub repo",
    ),
    Case(
        "cache-attention-mask",
        "a cache written for other attention masks",
        _cache_with_changed_attention_mask,
        ValueError,
        "is not the example the cache holds",
    ),
    # ---- found while training ----
    Case(
        "teacher-nan",
        "a teacher whose logits are NaN",
        lambda p: _train_on_nan_teacher(p, "kl"),
        FloatingPointError,
        "the teacher's logits hold NaN or +inf",
    ),
    Case(
        "teacher-nan-logit-mse",
        "a teacher whose logits are NaN, with `logit_mse`",
        lambda p: _train_on_nan_teacher(p, "logit_mse"),
        FloatingPointError,
        "logit_mse = nan",
    ),
    Case(
        "student-nan",
        "a student whose logits are NaN",
        lambda p: trainer(p, nan_model(tiny_bert(hidden=16, seed=2))).train(),
        FloatingPointError,
        "the student's logits hold NaN or +inf",
    ),
    Case(
        "labels-all-ignored",
        "a causal-LM data set whose labels are all -100",
        _labels_all_ignored,
        ValueError,
        "labels are -100 everywhere",
    ),
    Case(
        "cache-garbage-shard",
        "a cache shard replaced by garbage (read without checksums)",
        _open_garbage_shard_unverified,
        ValueError,
        "is not a readable safetensors file",
    ),
    # ---- once silently wrong, now correct ----
    Case(
        "cache-corrupt-rerun",
        "`write_teacher_cache` again over a corrupted shard",
        lambda p: _rewrite_damaged_shard(p, _flip_last_byte),
        check=_check_repaired,
    ),
    Case(
        "cache-deleted-rerun",
        "`write_teacher_cache` again after deleting a shard",
        lambda p: _rewrite_damaged_shard(p, os.remove),
        check=_check_repaired,
    ),
    Case(
        "eval-terms",
        "`predict()`, `evaluate(metric_key_prefix=...)`, a dict of eval sets, an unlabeled eval set",
        _eval_terms,
        check=_check_eval_terms,
    ),
    Case(
        "label-smoothing",
        "`label_smoothing_factor=0.2`",
        _smoothed_ce,
        check=lambda result, _: pytest.approx(result[1], abs=1e-5) == result[0],
    ),
    Case(
        "card-language",
        '`create_model_card("en", "apache-2.0")` (Trainer\'s order)',
        _card_language_first,
        check=lambda card, _: "language:\n- en" in card and "license: apache-2.0" in card,
    ),
    Case(
        "token-classifier-transfer",
        "token-classification rows without labels",
        _token_classifier_transfer_rows,
        check=lambda result, _: result[0].positions.item() == 21 and result[1]["kl"] > 0 and "ce" not in result[1],
    ),
    Case(
        "vision-language-shift",
        "a decoder-only `…ForConditionalGeneration` (Llava)",
        _vision_language_shift,
        check=lambda result, _: result[0] and result[1] == pytest.approx(result[2], abs=1e-6),
    ),
    # ---- schemes ----
    Case(
        "noise-not-callable",
        '`student_noise="mask"`',
        lambda p: trainer(p, student_noise="mask"),
        TypeError,
        "student_noise must be a callable batch → batch",
    ),
    Case(
        "noise-chunked",
        "`student_noise` with `chunk_size`",
        lambda p: trainer(p, tiny_gpt2(seed=2), tiny_gpt2(seed=1), lm_data(), chunk_size=4, student_noise=_masking()),
        ValueError,
        "student_noise does not work with chunk_size",
    ),
    Case(
        "noisy-hard-cache",
        '`noisy_student(cache, ..., pseudo_labels="hard")`',
        lambda p: _noisy(p, teacher="cache", pseudo_labels="hard"),
        ValueError,
        "hard pseudo-labels rewrite the labels column, which a TeacherCache fingerprints",
    ),
    Case(
        "noisy-threshold",
        "`noisy_student(..., pseudo_label_threshold=1.0)`",
        lambda p: _noisy(p, pseudo_label_threshold=1.0),
        ValueError,
        "the confidence threshold must lie in [0, 1)",
    ),
    Case(
        "noisy-rounds",
        "`noisy_student(..., rounds=0)`",
        lambda p: _noisy(p, rounds=0),
        ValueError,
        "noisy_student needs rounds >= 1",
    ),
    Case(
        "pseudo-label-tokens",
        "`pseudo_label(a causal LM, ...)`",
        lambda p: _pseudo_label_lm(),
        ValueError,
        "pseudo_label labels whole examples; GPT2LMHeadModel predicts per token",
    ),
    Case(
        "recipe-one-of-teachers",
        "a recipe with `--teachers A` (one folder)",
        lambda p: SchemeChoice(teachers="outputs/a").teacher_paths(None),
        ValueError,
        "--teachers needs at least two comma-separated folders",
    ),
    Case(
        "recipe-chain-of-teachers",
        "a recipe with `--teachers A,B --scheme teacher_assistant`",
        lambda p: _recipe_args(p, "--teachers", "a,b", "--scheme", "teacher_assistant"),
        ValueError,
        "--teachers with --scheme teacher_assistant: it starts from one",
    ),
    Case(
        "mean-teacher-decay",
        "`EMATeacher(student, decay=1.0)`",
        lambda p: EMATeacher(tiny_bert(), decay=1.0),
        ValueError,
        "the mean teacher's decay must lie in [0, 1)",
    ),
    Case(
        "mean-teacher-other-student",
        "`DistillationTrainer(model=B, teacher_model=EMATeacher(A))`",
        lambda p: trainer(p, tiny_bert(hidden=32), EMATeacher(tiny_bert(hidden=16))),
        ValueError,
        "the EMATeacher was copied from another model than the trainer's student",
    ),
    Case(
        "mean-teacher-sharded",
        "an `EMATeacher` under DeepSpeed or FSDP",
        lambda p: EMATeacher(tiny_bert()).attach(SimpleNamespace(is_deepspeed_enabled=True, is_fsdp_enabled=False)),
        ValueError,
        "DeepSpeed / FSDP shard or own its parameters",
    ),
    Case(
        "rampup-negative",
        "`distillation_rampup_steps=-1`",
        lambda p: config(p, distillation_rampup_steps=-1),
        ValueError,
        "distillation_rampup_steps must be an integer >= 0",
    ),
    Case(
        "recipe-mean-teacher-of-teachers",
        "a recipe with `--teachers A,B --scheme mean_teacher`",
        lambda p: _recipe_args(p, "--teachers", "a,b", "--scheme", "mean_teacher"),
        ValueError,
        "--teachers with --scheme mean_teacher: it trains its own teachers with the student",
    ),
    Case(
        "recipe-dml-one-peer",
        "a recipe with `--scheme mutual_learning --peers 1`",
        lambda p: _recipe_args(p, "--scheme", "mutual_learning", "--peers", "1"),
        ValueError,
        "mutual learning needs at least 2 peers, got 1",
    ),
    Case(
        "recipe-unknown-scheme",
        "a recipe with `--scheme dml` (the registry's name is `mutual_learning`)",
        lambda p: _recipe_args(p, "--scheme", "dml"),
        ValueError,
        "unknown scheme 'dml'",
    ),
    Case(
        "dml-one-peer",
        "`MutualLearningTrainer([model])`",
        lambda p: _peers(p, [tiny_bert()]),
        ValueError,
        "mutual learning needs at least two peers",
    ),
    Case(
        "dml-same-model-twice",
        "`MutualLearningTrainer([model, model])`",
        lambda p: (lambda model: _peers(p, [model, model]))(tiny_bert()),
        ValueError,
        "the same model is given twice as a peer",
    ),
    Case(
        "dml-label-sets",
        "peers with 3 and 4 classes",
        lambda p: _peers(p, [tiny_bert(), tiny_bert(num_labels=4)]),
        ValueError,
        "the peers' outputs differ in width (peer0: 3, peer1: 4",
    ),
    Case(
        "dml-kinds",
        "a sequence classifier and a causal LM as peers",
        lambda p: _peers(p, [tiny_bert(num_labels=VOCAB), tiny_gpt2()]),
        ValueError,
        "the peers are of different kinds",
    ),
    Case(
        "dml-feature-loss",
        '`losses="kl,hidden_mse"` for peers',
        lambda p: _peers(p, [tiny_bert(), tiny_bert()], losses="kl,hidden_mse"),
        ValueError,
        "mutual learning exchanges predictions, and ['hidden_mse'] read other features",
    ),
    Case(
        "dml-load-best",
        "`load_best_model_at_end=True` for peers",
        lambda p: _peers(
            p, [tiny_bert(), tiny_bert()], load_best_model_at_end=True, eval_strategy="steps", save_strategy="steps"
        ),
        ValueError,
        "mutual learning keeps every peer",
    ),
    Case(
        "byot-token-level",
        "`EarlyExitModel(a causal LM, exits_after=[1])`",
        lambda p: EarlyExitModel(tiny_gpt2(), exits_after=[1]),
        ValueError,
        "early exits pool each example to one vector",
    ),
    Case(
        "byot-exit-after-last-block",
        "`EarlyExitModel(a 2-block BERT, exits_after=[2])`",
        lambda p: EarlyExitModel(tiny_bert(layers=2), exits_after=[2]),
        ValueError,
        "an exit after block 2: BertForSequenceClassification has blocks 1..2",
    ),
    Case(
        "byot-no-exits",
        "`EarlyExitModel(model, exits_after=[])`",
        lambda p: EarlyExitModel(tiny_bert(), exits_after=[]),
        ValueError,
        "exits_after is empty",
    ),
    Case(
        "byot-hint-without-projector",
        "`SelfDistillationTrainer(hint_weight=1)` on exits built without `hint=True`",
        lambda p: SelfDistillationTrainer(
            EarlyExitModel(tiny_bert(layers=3), exits_after=[1]), config(p / "out"), hint_weight=1.0
        ),
        ValueError,
        "hint_weight > 0 needs exits with hint projectors",
    ),
    Case(
        "byot-plain-model",
        "`SelfDistillationTrainer(model)` without exits",
        lambda p: SelfDistillationTrainer(tiny_bert(), config(p / "out")),
        TypeError,
        "SelfDistillationTrainer trains an EarlyExitModel",
    ),
    Case(
        "self-distillation-no-exits",
        "`SelfDistillationConfig(exits_after=[])`",
        lambda p: SelfDistillationConfig(exits_after=[]),
        ValueError,
        "exits_after is empty",
    ),
    Case(
        "byot-regression",
        "`EarlyExitModel(a num_labels=1 regression head, ...)`",
        lambda p: EarlyExitModel(tiny_bert(layers=3, num_labels=1), exits_after=[1]),
        ValueError,
        "early exits are classifiers trained with cross-entropy",
    ),
    Case(
        "teacher-bounded-class-labels",
        "`teacher_bounded` on class labels",
        lambda p: get_loss("teacher_bounded")(
            ModelFeatures(logits=torch.zeros(2, 1)),
            ModelFeatures(logits=torch.zeros(2, 1)),
            labels=torch.tensor([0, 1]),
        ),
        ValueError,
        "it needs float labels (NaN for unlabeled rows)",
    ),
    Case(
        "teacher-bounded-margin",
        '`losses="teacher_bounded:1:margin=-1"`',
        lambda p: trainer(p, tiny_bert(num_labels=1), tiny_bert(num_labels=1), losses="teacher_bounded:1:margin=-1"),
        ValueError,
        "teacher_bounded needs a finite margin >= 0",
    ),
    Case(
        "embeddings-without-encoder",
        '`losses="embedding_mse"` on a classifier',
        lambda p: trainer(p, losses="embedding_mse"),
        ValueError,
        "wrap the model in hf_kd.sentence_embeddings.SentenceEmbeddingModel",
    ),
    Case(
        "embeddings-narrow-no-projector",
        '`losses="embedding_mse:1:projector=None"`, student 16 wide, teacher 32',
        lambda p: trainer(
            p,
            SentenceEmbeddingModel(tiny_bert(hidden=16).bert),
            SentenceEmbeddingModel(tiny_bert(seed=1).bert),
            processing_class=_wordpiece(p),  # a bare encoder saves with its tokenizer
            losses='[{"name": "embedding_mse", "projector": null}]',
        ),
        ValueError,
        "the student's embeddings are 16 wide and the teacher's 32",
    ),
    Case(
        "embeddings-pca-equal-widths",
        "`init_projector_from_pca` with equal widths (no projector)",
        lambda p: get_loss("embedding_mse").init_projector_from_pca(torch.zeros(4, 2)),
        ValueError,
        "init_projector_from_pca needs a linear projector",
    ),
    Case(
        "retrieval-metric-name",
        '`retrieval_metrics(scores, relevant, ("mrr",))`',
        lambda p: retrieval_metrics({"q": {"d": 1.0}}, {"q": {"d": 1}}, ("mrr",)),
        ValueError,
        "retrieval metrics look like mrr@10",
    ),
    Case(
        "retrieval-missing-query",
        "`retrieval_metrics` with a judged query that has no scores",
        lambda p: retrieval_metrics({"q1": {"d": 1.0}}, {"q1": {"d": 1}, "q2": {"d": 1}}),
        ValueError,
        "1 queries have relevance grades but no scores",
    ),
    Case(
        "ranking-without-groups",
        '`losses="listwise_kl"` on a classifier\'s B×1 scores',
        lambda p: get_loss("listwise_kl")(
            ModelFeatures(logits=torch.zeros(4, 1)), ModelFeatures(logits=torch.zeros(4, 1))
        ),
        ValueError,
        "listwise_kl compares each query's candidates: scores must be B×G with G >= 2",
    ),
    Case(
        "ranking-ungrouped-row",
        "`RankingCollator()` on a row of one token list",
        lambda p: RankingCollator()([{"input_ids": [5, 6, 7], "labels": [1]}]),
        ValueError,
        "ranking row 0 is not grouped",
    ),
    Case(
        "ranking-group-size",
        "`RankingCollator(group_size=3)` on a query with 2 candidates",
        lambda p: RankingCollator(group_size=3)([{"input_ids": [[5], [6]]}]),
        ValueError,
        "ranking row 0 has 2 candidates but group_size is 3",
    ),
    Case(
        "ranking-teacher-scores-count",
        "`teacher_scores` with 1 score for 2 candidates",
        lambda p: RankingCollator()([{"input_ids": [[5], [6]], "teacher_scores": [1.0]}]),
        ValueError,
        "ranking row 0: 1 teacher_scores for 2 candidates",
    ),
    # ---- input views, cross-modal and federated ----
    Case(
        "views-teacher-labels",
        "cross-modal: the teacher's rows carry labels",
        lambda p: paired_views(
            Dataset.from_dict({"input_values": [[0.0] * 8], "labels": [0]}),
            Dataset.from_dict({"input_ids": [[1, 2]], "labels": [0]}),
        ),
        ValueError,
        "labels go with the student's view",
    ),
    Case(
        "views-missing",
        "cross-modal: rows without the teacher's view (no `teacher_*` column)",
        lambda p: check_views(tiny_bert(seed=1), tiny_bert(seed=2), ["input_ids", "labels"]),
        ValueError,
        "cross-modal distillation needs the teacher's view in every row",
    ),
    Case(
        "views-unread",
        "cross-modal: a `teacher_*` column the teacher's forward does not take",
        lambda p: check_views(tiny_bert(seed=1), tiny_bert(seed=2), ["input_ids", "teacher_pixel_values"]),
        ValueError,
        "does not take ['teacher_pixel_values'] from its view",
    ),
    Case(
        "views-mixed-batch",
        "a batch in which some rows have the teacher's view and some not",
        lambda p: ViewCollator(lambda r: pad_rows(r, 0), lambda r: pad_rows(r, 0))(
            [{"input_ids": [1], "teacher_input_ids": [1]}, {"input_ids": [1]}]
        ),
        ValueError,
        "1 of the batch's 2 rows have no teacher_* columns",
    ),
    Case(
        "federated-alpha",
        "`dirichlet_split(..., alpha=0)`",
        lambda p: dirichlet_split([0, 1] * 10, 2, alpha=0),
        ValueError,
        "alpha must be > 0",
    ),
    Case(
        "federated-mode",
        '`FederatedConfig(mode="fedprox")`',
        lambda p: FederatedConfig(mode="fedprox"),
        ValueError,
        "mode must be one of ('fedavg', 'feddf', 'fedmd')",
    ),
    Case(
        "federated-architectures",
        "FedAvg / FedDF with clients of different architectures",
        lambda p: run_federated(
            lambda k: tiny_bert(seed=k, hidden=16 + 16 * k),
            lambda: tiny_bert(seed=0),
            [Dataset.from_dict({"input_ids": [[1, 2]], "labels": [0]})] * 2,
            Dataset.from_dict({"input_ids": [[1, 2]]}),
            FederatedConfig(mode="feddf", rounds=1),
        ),
        ValueError,
        "every client and the server need the same architecture",
    ),
    Case(
        "ranking-groups-differ",
        "`margin_mse` with the teacher scoring 4 candidates per query and the student 3",
        lambda p: get_loss("margin_mse")(
            ModelFeatures(logits=torch.zeros(2, 3)), ModelFeatures(logits=torch.zeros(2, 4))
        ),
        ValueError,
        "both must score the same groups",
    ),
    Case(
        "cross-encoder-labels",
        "`CrossEncoderRanker(a num_labels=3 classifier)`",
        lambda p: CrossEncoderRanker(tiny_bert(num_labels=3)),
        ValueError,
        "a cross-encoder scores a pair with one logit",
    ),
    Case(
        "ner-tags-count",
        "`tokenize_words` with 2 tags for 3 words",
        lambda p: tokenize_words(
            Dataset.from_list([{"words": ["a", "b", "c"], "tags": ["O", "O"]}]), _wordpiece(p), {"O": 0}
        ),
        ValueError,
        "row 0: 2 tags for 3 words",
    ),
    Case(
        "ner-unknown-tag",
        "`tokenize_words` with a tag missing from `label2id`",
        lambda p: tokenize_words(Dataset.from_list([{"words": ["a"], "tags": ["B-LOC"]}]), _wordpiece(p), {"O": 0}),
        ValueError,
        "tag 'B-LOC' is not in label2id",
    ),
    Case(
        "ner-teacher-words-all-subtokens",
        '`add_teacher_words` on rows tokenised with `subtokens="all"`',
        lambda p: _teacher_words_all(p),
        ValueError,
        "tokenize the student's rows with subtokens='first'",
    ),
    Case(
        "dml-push",
        "`push_to_hub=True` for peers",
        lambda p: _peers(p, [tiny_bert(), tiny_bert()], push_to_hub=True, hub_model_id="alice/peers"),
        ValueError,
        "a MutualLearningTrainer does not push",
    ),
    Case(
        "push-private",
        "`push_to_hub(private=True)`",
        lambda p: _push(p, "private"),
        check=lambda state, _: state.repos == {"alice/tiny-student": {"private": True}},
    ),
    Case(
        "push-checkpoints",
        '`push_to_hub=True, hub_strategy="checkpoint"` with a learned projector',
        lambda p: _push(p, "checkpoints"),
        check=_check_pushed_checkpoints,
    ),
]
CASES += area_cases()  # the per-area tables: tests/refusals_*.py


def _wordpiece(tmp_path):
    from transformers import BertTokenizerFast

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b", "c", "bro", "##wn"]))
    return BertTokenizerFast(str(vocab))


def _teacher_words_all(tmp_path):
    words = Dataset.from_list([{"words": ["brown"], "tags": ["O"]}])
    rows = tokenize_words(words, _wordpiece(tmp_path), {"O": 0}, subtokens="all")
    return add_teacher_words(rows, words, _wordpiece(tmp_path))


@dataclass
class _NoRecipeFlags:
    """A recipe's own flags (none here) beside the scheme's and the distillation ones."""


def _recipe_args(tmp_path, *flags):
    return parse_recipe_args(_NoRecipeFlags, DistillationConfig, ["--output_dir", str(tmp_path / "out"), *flags])


def _peers(tmp_path, peers, **overrides):
    return MutualLearningTrainer(peers, config(tmp_path / "out", **overrides), train_dataset=classification_data())


def _masking():
    from hf_kd.noise import TokenMasking

    return TokenMasking(0.1, 1)


def _noisy(tmp_path, teacher="model", **options):
    from hf_kd.schemes.noisy_student import noisy_student

    data = add_sample_index(classification_data(n=8))
    source = tiny_bert(seed=1)
    if teacher == "cache":
        source = write_teacher_cache(source, data, str(tmp_path / "cache"), top_k=3)
    return noisy_student(source, lambda k: tiny_bert(seed=k), config(tmp_path / "out"), train_dataset=data, **options)


def _pseudo_label_lm():
    from hf_kd.schemes.noisy_student import pseudo_label

    return pseudo_label(tiny_gpt2(), lm_data(n=2))


def _on_meta_device(build):
    with torch.device("meta"):
        return build(seed=1)


def _own_teacher(tmp_path):
    student = tiny_bert(seed=2)
    return trainer(tmp_path, student, student)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input(case, tmp_path):
    if case.error is not None:
        with pytest.raises(case.error) as raised:
            case.run(tmp_path)
        assert case.says in str(raised.value)
        assert produced_result(tmp_path / "out") == []
    else:
        case.check(case.run(tmp_path), tmp_path)


@pytest.mark.parametrize("name", ["rkd_distance", "rkd_angle", "sp", "pkt", "irg", "infonce"])
def test_relation_losses_are_zero_below_their_minimum_batch(name):
    # The measurement behind the batch-size refusals: exactly 0 just below the minimum, not 0 at it.
    loss = get_loss(name)
    torch.manual_seed(0)

    def value(batch):
        hidden = lambda: (torch.randn(batch, 4, 8), torch.randn(batch, 4, 8))  # noqa: E731
        student, teacher = ModelFeatures(hidden_states=hidden()), ModelFeatures(hidden_states=hidden())
        loss.setup(student, teacher)
        return loss(student, teacher).item()

    assert value(loss.min_batch_size - 1) == 0.0
    assert value(loss.min_batch_size) != 0.0


def refusal_table() -> str:
    rows = ["| input | hf_kd says |", "|---|---|"]
    rows += [f"| {case.input} | `{type_name(case)}`: “{case.says}…” |" for case in CASES if case.error is not None]
    return "\n".join(rows)


def type_name(case: Case) -> str:
    return case.error.__name__


def test_the_docs_list_every_refusal():
    # The table lives on the docs site, written at build time by the docs hook from the cases: the page asks for it,
    # the hook's rows are exactly refusal_table()'s (same rows, same order, none left out or added), every area file
    # has a section title of its own, and the README keeps no hand-pasted copy that could go stale.
    pytest.importorskip("mkdocs", reason='the docs extra is not installed (pip install -e ".[docs]")')
    spec = importlib.util.spec_from_file_location(
        "docs_hook_hf_kd_docs", os.path.join(ROOT, "docs", "hooks", "hf_kd_docs.py")
    )
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    with open(os.path.join(ROOT, "docs", "refusals.md"), encoding="utf-8") as handle:
        assert "<!-- hf_kd:refusals -->" in handle.read().splitlines()
    page = hook.refusals_page()
    rows = [line for line in page.splitlines() if line.startswith("| ") and line != "| input | hf_kd says |"]
    assert rows == refusal_table().splitlines()[2:]
    areas = {path.stem.removeprefix("refusals_") for path in pathlib.Path(ROOT, "tests").glob("refusals_*.py")}
    assert areas - set(hook.REFUSAL_AREAS) == set(), "give each tests/refusals_AREA.py a title in REFUSAL_AREAS"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        assert "<!-- refusals:start -->" not in handle.read()


def test_every_logged_term_survives_a_process_without_labels(tmp_path):
    # 2 labeled rows of 64, 2 rows per process, a log every step: the process whose rows are unlabeled never computes
    # ce. Both processes must reduce the same terms (a hang before) and log what one process logs.
    from conftest import run_two_processes

    worker = os.path.join(ROOT, "tests", "distributed", "sparse_labels_worker.py")
    run_two_processes(worker, tmp_path / "two", 2, timeout=300)
    launch([sys.executable, worker, tmp_path / "one", 4], timeout=300, check=True)
    two, one = (json.loads((tmp_path / run / "log.json").read_text()) for run in ("two", "one"))
    assert len(one) == len(two) == 16
    assert sum("ce" in entry for entry in one) == 2  # the two steps with a labeled row
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], abs=2e-6), key


if __name__ == "__main__":
    print(refusal_table())


def test_finite_outputs_allow_masked_vocabulary_and_undistilled_positions_only():
    from hf_kd.features import finite_outputs, non_finite_fields

    logits = torch.randn(2, 3, 5)
    logits[..., -1] = float("-inf")  # a masked vocabulary entry: legal
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert finite_outputs(ModelFeatures(logits=logits), mask)
    logits[0, 2, 0] = float("nan")  # at a position that is not distilled
    assert finite_outputs(ModelFeatures(logits=logits), mask) and not finite_outputs(ModelFeatures(logits=logits))
    logits[1, 0, 1] = float("inf")
    assert not finite_outputs(ModelFeatures(logits=logits), mask)
    hidden = (torch.zeros(2, 3, 4), torch.full((2, 3, 4), float("-inf")))  # -inf is not legal in features
    assert non_finite_fields(ModelFeatures(logits=torch.zeros(2, 3, 5), hidden_states=hidden), mask) == [
        "hidden_states[1]"
    ]
