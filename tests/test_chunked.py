"""Chunked token-level KD (``chunk_size``) against the plain path: same values, same gradients, less memory."""

import pytest
import torch
from conftest import classification_data, config, lm_data, tiny_bert, tiny_gpt2

from hf_kd import DistillationTrainer
from hf_kd.checks import check_chunkable as _check_chunkable
from hf_kd.losses import get_loss

RESPONSE_LOSSES = [
    "kl",
    "reverse_kl",
    "jsd:1.0:beta=0.3",
    "skew_kl",
    "skew_reverse_kl",
    "tvd",
    "soft_ce",
    "logit_mse",
    "prob_mse",
    "dkd",
    "uld",
]


def loss_and_grads(tmp_path, student, teacher, losses, chunk_size, **overrides):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=lm_data(n=6),
        args=config(tmp_path, losses=losses, chunk_size=chunk_size, **overrides),
    )
    batch = {k: torch.tensor(v) for k, v in lm_data(n=6)[:].items()}
    student.zero_grad()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("loss", RESPONSE_LOSSES)
def test_chunked_equals_plain_values_and_gradients(tmp_path, loss):
    student, teacher = tiny_gpt2(hidden=16, layers=1, seed=2), tiny_gpt2(seed=1)  # GPT-2 ties lm_head to wte
    plain, plain_grads = loss_and_grads(tmp_path / "a", student, teacher, loss, None)
    chunked, chunked_grads = loss_and_grads(tmp_path / "b", student, teacher, loss, 5)
    assert chunked == pytest.approx(plain, rel=1e-5)
    assert set(chunked_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_matches_without_labels_and_with_the_convex_mix(tmp_path):
    student, teacher = tiny_gpt2(hidden=16, layers=1, seed=2), tiny_gpt2(seed=1)
    for overrides in ({"alpha": 0.3}, {"hard_label_weight": 0.0}):
        plain, _ = loss_and_grads(tmp_path / "a", student, teacher, "kl,tvd", None, **overrides)
        chunked, _ = loss_and_grads(tmp_path / "b", student, teacher, "kl,tvd", 4, **overrides)
        assert chunked == pytest.approx(plain, rel=1e-5)




def test_chunked_training_matches_plain_training(tmp_path):
    def train(chunk_size, name):
        trainer = DistillationTrainer(
            model=tiny_gpt2(hidden=16, layers=1, seed=2),
            teacher_model=tiny_gpt2(seed=1),
            train_dataset=lm_data(n=16),
            args=config(
                tmp_path / name,
                max_steps=2,
                per_device_train_batch_size=4,
                gradient_accumulation_steps=2,
                optim="sgd",
                learning_rate=0.5,
                lr_scheduler_type="constant",
                losses="kl,tvd",
                chunk_size=chunk_size,
            ),
        )
        trainer.train()
        logs = [e for e in trainer.state.log_history if "loss" in e]
        return trainer.model.state_dict(), logs

    plain, plain_logs = train(None, "plain")
    chunked, chunked_logs = train(3, "chunked")
    for key, value in plain.items():
        torch.testing.assert_close(chunked[key], value, rtol=1e-4, atol=1e-6, msg=key)
    for one, two in zip(plain_logs, chunked_logs):
        for key in ("loss", "ce", "kl", "tvd"):
            assert two[key] == pytest.approx(one[key], rel=1e-4)


def test_chunked_path_never_builds_full_logits(tmp_path):
    # The models are asked for their last position's logits only; the losses see chunk-sized logits.
    seen = []
    student, teacher = tiny_gpt2(hidden=16, layers=1, seed=2), tiny_gpt2(seed=1)
    for model in (student, teacher):
        model.lm_head.register_forward_hook(lambda module, args, out: seen.append(out.shape[:-1].numel()))
    loss_and_grads(tmp_path, student, teacher, "kl", 4)
    assert seen and max(seen) <= 6 * 1 + 4  # 6 rows × 1 kept position from forward(); chunks of ≤ 4 positions


@pytest.mark.parametrize(
    ("model", "losses", "message"),
    [
        ("bert", "kl", "applies to causal LMs"),
        ("gpt2", "kl,hidden_mse", "logit losses only"),
    ],
)
def test_chunk_size_errors(tmp_path, model, losses, message):
    student, teacher = (
        (tiny_bert(seed=2), tiny_bert(seed=1)) if model == "bert" else (tiny_gpt2(seed=2), tiny_gpt2(seed=1))
    )
    data = classification_data() if model == "bert" else lm_data()
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(
            model=student, teacher_model=teacher, train_dataset=data, args=config(tmp_path, losses=losses, chunk_size=4)
        )
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        config(tmp_path, chunk_size=0)


def test_chunk_size_under_fsdp1_is_refused():
    # FSDP1 flattens parameters into units hf_kd cannot gather for the heads; FSDP2 is supported (test_distributed).
    losses = [get_loss("kl")]
    with pytest.raises(ValueError, match="needs FSDP2"):
        _check_chunkable(losses, causal=True, token_level=True, fsdp=True, fsdp2=False)
    _check_chunkable(losses, causal=True, token_level=True, fsdp=True, fsdp2=True)


def test_chunked_equals_plain_with_final_logit_softcapping(tmp_path):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    def gemma(hidden, seed):
        torch.manual_seed(seed)
        return Gemma2ForCausalLM(
            Gemma2Config(
                vocab_size=64,
                hidden_size=hidden,
                intermediate_size=2 * hidden,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                final_logit_softcapping=3.0,
            )
        )

    student, teacher = gemma(16, seed=2), gemma(32, seed=1)
    plain, plain_grads = loss_and_grads(tmp_path / "a", student, teacher, "kl,tvd", None)
    chunked, chunked_grads = loss_and_grads(tmp_path / "b", student, teacher, "kl,tvd", 5)
    assert chunked == pytest.approx(plain, rel=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
