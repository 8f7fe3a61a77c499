"""Multi-stage schemes, resuming, loss paths and teacher caches: a chain refuses before its first stage trains
what a later stage would refuse; a checkpoint cut short by a kill inside its save is skipped, not fatal; a dotted
loss path imports nothing the user did not import or opt into; a cache manifest names no file outside its folder."""

from __future__ import annotations

import json
import logging
import os
import sys

from conftest import ROOT, classification_data, config, launch, lm_data, tiny_bert, tiny_gpt2
from refusal_cases import Case

from hf_kd import TeacherCache, write_teacher_cache
from hf_kd.config import DistillationConfig, parse_losses
from hf_kd.recipe_support.cli import parse_args
from hf_kd.schemes.born_again import born_again
from hf_kd.schemes.mean_teacher import mean_teacher
from hf_kd.schemes.mutual_learning import mutual_learning
from hf_kd.schemes.noisy_student import noisy_student
from hf_kd.schemes.self_distillation import self_distillation
from hf_kd.schemes.teacher_assistant import teacher_assistant

# ---- a checkpoint cut short by a kill inside its save -----------------------------------------------------------


def _resume_after_a_killed_save(tmp_path, run, folder):
    """Run a scheme (checkpoints at steps 2 and 4), then make its checkpoint-4 what a kill inside the save leaves
    (no trainer_state.json, written last) and its result unsaved, and run it again: the logged warnings and the
    folder."""
    out = tmp_path / "out"
    run(out)
    stage = out / folder
    (stage / "checkpoint-4" / "trainer_state.json").unlink()
    (stage / "model" / "distillation_config.json").unlink(missing_ok=True)  # a chain's stage: not finished
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("hf_kd")
    logger.addHandler(handler)
    try:
        run(out)
    finally:
        logger.removeHandler(handler)
    return records, stage


def _check_resumed_from_the_complete_one(result, tmp_path):
    records, stage = result
    assert any("checkpoint-4" in message and "trainer_state.json" in message for message in records), records
    assert any("checkpoint-2" in message for message in records), records
    state = json.loads((stage / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4  # steps 3-4 trained again from checkpoint-2, checkpoint-4 saved whole


def _distillation_trainer(out):
    from hf_kd import DistillationTrainer

    student, teacher = tiny_bert(hidden=16, seed=2), tiny_bert(seed=1)
    trainer = DistillationTrainer(student, teacher, _checkpointed(out), train_dataset=classification_data(n=16))
    trainer.train(resume_from_checkpoint=True if (out / "checkpoint-2").exists() else None)


def _checkpointed(out, **overrides):
    return config(out, max_steps=4, save_strategy="steps", save_steps=2, **overrides)


def _stage_chain(out):
    return born_again(
        tiny_bert(hidden=16, seed=1),
        lambda generation: tiny_bert(hidden=16, seed=10 + generation),
        _checkpointed(out),
        generations=1,
        train_dataset=classification_data(n=16),
    )


def _mean_teacher(out):
    return mean_teacher(
        tiny_bert(hidden=16, seed=2), _checkpointed(out), ema_decay=0.9, train_dataset=classification_data(n=16)
    )


def _mutual(out):
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=16, seed=2)]
    return mutual_learning(peers, _checkpointed(out, losses="kl"), train_dataset=classification_data(n=16))


def _self_distillation(out):
    model = tiny_bert(layers=2, seed=1)
    return self_distillation(
        model, _checkpointed(out, losses="kl"), exits_after=[1], train_dataset=classification_data(n=16)
    )


def _mutual_rerun_with_other_losses(out):
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=16, seed=2)]
    first = config(out, max_steps=2, save_strategy="steps", save_steps=2, losses="kl")
    mutual_learning(peers, first, train_dataset=classification_data(n=32))
    peers = [tiny_bert(hidden=16, seed=1), tiny_bert(hidden=16, seed=2)]
    return mutual_learning(peers, _checkpointed(out, losses="jsd"), train_dataset=classification_data(n=32))


# ---- a chain refuses, before its first stage, what a later stage would refuse ------------------------------------


def _refused_before_the_first_stage(tmp_path, run, first_stage):
    try:
        run(tmp_path / "out")
    except ValueError:
        trained = tmp_path / "out" / first_stage
        assert not trained.exists(), f"{first_stage} trained before the refusal: {sorted(os.listdir(trained))}"
        raise


def _born_again_weights(out):
    args = config(out, max_steps=1, teacher_aggregation="weighted", teacher_weights=[1.0, 1.0])
    return born_again(
        tiny_bert(hidden=16, seed=1),
        lambda generation: tiny_bert(hidden=16, seed=10 + generation),
        args,
        generations=3,
        ensemble_last=True,
        train_dataset=classification_data(n=16),
    )


def _born_again_chunks(out):
    return born_again(
        tiny_gpt2(hidden=16, seed=1),
        lambda generation: tiny_gpt2(hidden=16, seed=10 + generation),
        config(out, max_steps=1, chunk_size=8),
        generations=2,
        ensemble_last=True,
        train_dataset=lm_data(n=8),
    )


def _assistant_named_teacher(out):
    teachers = {"wide": tiny_bert(hidden=32, seed=1), "deep": tiny_bert(layers=3, seed=2)}
    return teacher_assistant(
        teachers,
        [tiny_bert(hidden=24, seed=3)],
        tiny_bert(hidden=16, seed=4),
        config(out, max_steps=1, losses=[{"name": "kl", "teacher": "wide"}]),
        train_dataset=classification_data(n=16),
    )


def _noisy_named_teacher(out):
    teachers = {"wide": tiny_gpt2(hidden=32, seed=1), "deep": tiny_gpt2(layers=3, seed=2)}
    return noisy_student(
        teachers,
        lambda round_number: tiny_gpt2(hidden=32, seed=10 + round_number),
        config(out, max_steps=1, losses=[{"name": "kl", "teacher": "wide"}]),
        train_dataset=lm_data(n=8),
        rounds=2,
    )


# ---- dotted loss paths import only what the user imported or opted into -----------------------------------------


def _loss_path_of_a_module_nobody_imported(tmp_path):
    sys.modules.pop("this", None)  # the Zen of Python: printed by `import this`
    try:
        config(tmp_path / "out", losses="this.Zen")
    finally:
        assert "this" not in sys.modules, "the loss path imported `this`"


def _loss_path_in_the_working_directory(tmp_path):
    """A .py beside the run (the working directory is on sys.path under `python -m`): never imported unasked."""
    script = (
        "import os, sys\n"
        "sys.path.insert(0, os.getcwd())\n"
        "from hf_kd import DistillationConfig\n"
        "try:\n"
        "    DistillationConfig(output_dir='out', losses='planted.Loss', report_to=[], use_cpu=True)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    (tmp_path / "planted.py").write_text("open('planted-ran', 'w').close()\n")
    ran = launch([sys.executable, "-c", script], timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT})
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert not (tmp_path / "planted-ran").exists(), "planted.py's top-level code ran"
    raise ValueError(ran.stdout.strip() or ran.stderr.strip())


def _loss_path_on_the_command_line(tmp_path):
    sys.modules.pop("this", None)
    try:
        parse_args([DistillationConfig], ["--output_dir", str(tmp_path / "out"), "--losses", "this.Zen:0.5"])
    finally:
        assert "this" not in sys.modules, "the loss path imported `this`"


def _loss_module(tmp_path, name):
    (tmp_path / f"{name}.py").write_text(
        "from hf_kd.losses import DistillationLoss, get_loss\n\n\n"
        "class HalfKL(DistillationLoss):\n"
        "    def __init__(self, temperature=1.0):\n"
        "        super().__init__()\n"
        "        self.temperature = temperature\n\n"
        "    def forward(self, student, teacher, mask=None, labels=None):\n"
        "        return 0.5 * get_loss('kl', temperature=self.temperature)(student, teacher, mask, labels)\n"
    )
    sys.path.insert(0, str(tmp_path))
    sys.modules.pop(name, None)


def _loss_path_opted_into(tmp_path):
    _loss_module(tmp_path, "opted_loss")
    try:
        args = config(tmp_path / "out", losses="opted_loss.HalfKL:0.5", trust_loss_imports=True)
    finally:
        sys.path.remove(str(tmp_path))
    return args


def _check_opted_into(args, tmp_path):
    assert "opted_loss" in sys.modules
    assert args.losses == [{"name": "opted_loss.HalfKL", "weight": 0.5}]
    assert parse_losses(args.losses)[0].name == "opted_loss.HalfKL"


# ---- a cache manifest names no file outside its folder ----------------------------------------------------------


def _cache(tmp_path):
    data = lm_data(n=8)
    teacher = tiny_gpt2(seed=1)
    folder = tmp_path / "cache"
    write_teacher_cache(teacher, data, str(folder), top_k=4, shard_size=4, progress=False)
    return folder, teacher, data


def _point_shard(folder, file):
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["shards"][1]["file"] = file
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _shard_outside(tmp_path, how, rewrite=False):
    folder, teacher, data = _cache(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.replace(folder / "shard-00001.safetensors", elsewhere / "x.safetensors")  # same bytes, same checksum
    if how == "dotdot":
        _point_shard(folder, "../elsewhere/x.safetensors")
    elif how == "absolute":
        _point_shard(folder, str(elsewhere / "x.safetensors"))
    else:  # a link inside the folder to a file outside it
        os.symlink(elsewhere / "x.safetensors", folder / "shard-00001.safetensors")
    if rewrite:
        return write_teacher_cache(teacher, data, str(folder), top_k=4, shard_size=4, progress=False)
    return TeacherCache.load(str(folder))


CASES = [
    Case(
        "resume-incomplete-checkpoint-trainer",
        "`DistillationTrainer.train(resume_from_checkpoint=True)` after a kill inside a save",
        lambda p: _resume_after_a_killed_save(p, _distillation_trainer, ""),
        check=_check_resumed_from_the_complete_one,
    ),
    Case(
        "resume-incomplete-checkpoint-stage",
        "a stage rerun after a kill inside a save (`checkpoint-4` without `trainer_state.json`)",
        lambda p: _resume_after_a_killed_save(p, _stage_chain, "generation1"),
        check=_check_resumed_from_the_complete_one,
    ),
    Case(
        "resume-incomplete-checkpoint-mean-teacher",
        "`mean_teacher` rerun after a kill inside a save",
        lambda p: _resume_after_a_killed_save(p, _mean_teacher, ""),
        check=_check_resumed_from_the_complete_one,
    ),
    Case(
        "resume-incomplete-checkpoint-mutual",
        "`mutual_learning` rerun after a kill inside a save",
        lambda p: _resume_after_a_killed_save(p, _mutual, ""),
        check=_check_resumed_from_the_complete_one,
    ),
    Case(
        "resume-incomplete-checkpoint-self-distillation",
        "`self_distillation` rerun after a kill inside a save",
        lambda p: _resume_after_a_killed_save(p, _self_distillation, ""),
        check=_check_resumed_from_the_complete_one,
    ),
    Case(
        "resume-another-set-up",
        '`mutual_learning(..., losses="jsd")` rerun in the folder of a `losses="kl"` run (its `checkpoint-2`)',
        _mutual_rerun_with_other_losses,
        ValueError,
        "was saved by a run with another set-up (losses: [{'name': 'kl', 'weight': 1.0}] → [{'name': 'jsd'",
    ),
    Case(
        "born-again-ensemble-weights",
        '`born_again(..., ensemble_last=True)` with `teacher_aggregation="weighted", teacher_weights=[1, 1]` '
        "for an ensemble of 3",
        lambda p: _refused_before_the_first_stage(p, _born_again_weights, "generation1"),
        ValueError,
        "stage 'generation3', taught by ['teacher', 'generation1', 'generation2'], would refuse its settings",
    ),
    Case(
        "born-again-ensemble-chunk-size",
        "`born_again(..., ensemble_last=True)` with `chunk_size`",
        lambda p: _refused_before_the_first_stage(p, _born_again_chunks, "generation1"),
        ValueError,
        "chunk_size runs one teacher's LM head chunk by chunk; 2 teachers were given",
    ),
    Case(
        "teacher-assistant-named-teacher",
        '`teacher_assistant({"wide": ..., "deep": ...}, ...)` with `losses=[{"name": "kl", "teacher": "wide"}]`',
        lambda p: _refused_before_the_first_stage(p, _assistant_named_teacher, "assistant1"),
        ValueError,
        "stage 'student', taught by ['teacher'], would refuse its settings",
    ),
    Case(
        "noisy-student-named-teacher",
        '`noisy_student({"wide": ..., "deep": ...}, ..., rounds=2)` with a loss naming the teacher `"wide"`',
        lambda p: _refused_before_the_first_stage(p, _noisy_named_teacher, "round1"),
        ValueError,
        "stage 'round2', taught by ['teacher'], would refuse its settings",
    ),
    Case(
        "loss-path-not-imported",
        '`losses="this.Zen"` (a module nothing imported)',
        _loss_path_of_a_module_nobody_imported,
        ValueError,
        "hf_kd imports no module a loss path names unless asked",
    ),
    Case(
        "loss-path-working-directory",
        '`losses="planted.Loss"` with a `planted.py` in the working directory',
        _loss_path_in_the_working_directory,
        ValueError,
        "hf_kd imports no module a loss path names unless asked",
    ),
    Case(
        "loss-path-command-line",
        "`--losses this.Zen:0.5` on the command line",
        _loss_path_on_the_command_line,
        ValueError,
        "or pass --trust_loss_imports",
    ),
    Case(
        "loss-path-opted-into",
        '`losses="my_module.MyLoss", trust_loss_imports=True`',
        _loss_path_opted_into,
        check=_check_opted_into,
    ),
    Case(
        "cache-shard-dotdot",
        'a cache manifest listing a shard `"../elsewhere/x.safetensors"`',
        lambda p: _shard_outside(p, "dotdot"),
        ValueError,
        "which is not a file inside the cache folder",
    ),
    Case(
        "cache-shard-absolute",
        "a cache manifest listing a shard by an absolute path",
        lambda p: _shard_outside(p, "absolute"),
        ValueError,
        "which is not a file inside the cache folder",
    ),
    Case(
        "cache-shard-symlink",
        "a cache shard that is a link to a file outside the cache folder",
        lambda p: _shard_outside(p, "symlink"),
        ValueError,
        "which is not a file inside the cache folder",
    ),
    Case(
        "cache-shard-outside-rerun",
        '`write_teacher_cache` again over a manifest listing `"../elsewhere/x.safetensors"`',
        lambda p: _shard_outside(p, "dotdot", rewrite=True),
        ValueError,
        "which is not a file inside the cache folder",
    ),
]
