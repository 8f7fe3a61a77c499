"""Refusals of the LLM distillation paths that project final hidden states themselves (``chunk_size``, a teacher's
token rows): a model whose own logits are not what hf_kd makes of its hidden states is refused on the first batch,
before any update, naming the model class and family."""

from __future__ import annotations

from conftest import config, lm_data
from refusal_cases import Case
from test_own_logits import _granite, _scaled_forward
from transformers import BertConfig, BertLMHeadModel

from hf_kd import DistillationTrainer


def _train(tmp_path, student, teacher):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=lm_data(n=8),
        args=config(tmp_path / "out", chunk_size=4, max_steps=1),
    )
    trainer.train()


def _bert_decoder_student(tmp_path):
    bert = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True
    )
    _train(tmp_path, BertLMHeadModel(bert), _granite(16, seed=1))


def _teacher_scaling_its_logits_unannounced(tmp_path):
    teacher = _granite(32, seed=1)
    teacher.config.logits_scaling = 1.0  # the config hf_kd reads says 1, the forward still divides by 8
    teacher.forward = _scaled_forward(teacher, 8.0)
    _train(tmp_path, _granite(16, seed=2), teacher)


CASES = [
    Case(
        "own-logits-student",
        "`chunk_size` with a `BertLMHeadModel` student (a prediction head before its output embeddings)",
        _bert_decoder_student,
        ValueError,
        "the student's own logits are not get_output_embeddings()(h) of its final hidden states",
    ),
    Case(
        "own-logits-teacher",
        "`chunk_size` with a teacher whose `forward` scales its logits in a way its config does not say",
        _teacher_scaling_its_logits_unannounced,
        ValueError,
        "GraniteForCausalLM (model family 'granite'). chunk_size (and a teacher's token rows) project final hidden",
    ),
]
