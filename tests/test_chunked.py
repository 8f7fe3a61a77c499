"""Chunked token-level KD (``chunk_size``) against the plain path: same values, same gradients, less memory."""

import math

import pytest
import torch
from conftest import classification_data, config, lm_data, tiny_bert, tiny_gpt2

from hf_kd import DistillationTrainer, ModelFeatures
from hf_kd.checks import check_chunkable as _check_chunkable
from hf_kd.losses import get_loss
from hf_kd.losses.chunked import chunked_token_terms
from hf_kd.losses.lm_head import LogitsHead

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


# ---- the fused chunked loss against the dense computation, function level ----------------------------------------


class _TinyLM(torch.nn.Module):
    """Just what LogitsHead reads: a config (its family) and output embeddings."""

    def __init__(self, head, model_type="llama", **fields):
        super().__init__()
        self.head = head
        self.config = type("Config", (), {"model_type": model_type, **fields})()

    def get_output_embeddings(self):
        return self.head


def _dense_terms(hidden, head, teacher_logits, targets, losses, with_label_loss):
    """The plain computation: whole logits, the losses' own forward passes."""
    logits = head(hidden)
    values = []
    if with_label_loss:
        values.append(torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum"))
    teacher = ModelFeatures(logits=teacher_logits)
    values += [loss(ModelFeatures(logits=logits), teacher, labels=targets) for loss in losses]
    return torch.stack(values)


def _loss(spec: str, **options):
    """A loss from its spec string (``jsd:1.0:beta=0.3``: weight left out, options kept)."""
    name, *parts = spec.split(":")
    options.update({key: float(value) for key, _, value in (part.partition("=") for part in parts if "=" in part)})
    return get_loss(name, **options)


FUSED_CASES = {
    "kl+ce": (["kl"], True, {}),
    "jsd, tau 2": (["jsd:1.0:beta=0.3"], False, {"temperature": 2.0}),
    "every loss": (RESPONSE_LOSSES[:-1], True, {}),  # uld compares sorted probabilities: autograd, like tvd
    "jsd beta 0 and 1": (["jsd:1.0:beta=0.0", "jsd:1.0:beta=1.0"], True, {}),
}


@pytest.mark.parametrize("case", list(FUSED_CASES))
@pytest.mark.parametrize("family", ["plain", "bias", "softcap", "hidden-division", "module"])
def test_fused_terms_equal_the_dense_computation(case, family):
    names, with_label_loss, options = FUSED_CASES[case]
    torch.manual_seed(0)
    rows, width, vocab = 11, 8, 24
    linear = torch.nn.Linear(width, vocab, bias=family == "bias")
    model = {
        "plain": lambda: _TinyLM(linear),
        "bias": lambda: _TinyLM(linear),
        "softcap": lambda: _TinyLM(linear, "gemma2", final_logit_softcapping=2.0),
        "hidden-division": lambda: _TinyLM(linear, "minicpm3", logits_scaling=4.0),
        "module": lambda: _TinyLM(torch.nn.Sequential(torch.nn.LayerNorm(width), linear)),  # autograd through it
    }[family]()
    head = LogitsHead(model)
    hidden = torch.randn(rows, width, requires_grad=True)
    teacher_hidden = torch.randn(rows, 6)
    teacher_head = torch.nn.Linear(6, vocab)
    targets = torch.randint(0, vocab, (rows,))
    targets[3] = -100  # a position without a label (distilled all the same)
    losses = [_loss(spec, **options) for spec in names]
    weights = torch.rand(len(losses) + int(with_label_loss)) + 0.1

    dense = _dense_terms(hidden, head, teacher_head(teacher_hidden).detach(), targets, losses, with_label_loss)
    (dense * weights).sum().mul(3.0).backward()  # 3: a factor the backward pass brings (e.g. loss scaling)
    expected = [hidden.grad] + [p.grad for p in head.trainable_parameters()]
    hidden.grad = None
    model.zero_grad()

    def teacher_logits(rows):
        return teacher_head(rows)

    sums = chunked_token_terms(
        hidden,
        (teacher_hidden,),
        targets,
        student_head=head,
        teacher_logits=teacher_logits,
        losses=losses,
        with_label_loss=with_label_loss,
        chunk_size=4,
        weights=weights,
    )
    torch.testing.assert_close(sums, dense.detach(), rtol=1e-5, atol=1e-6)
    (sums * weights).sum().mul(3.0).backward()
    for got, want in zip([hidden.grad] + [p.grad for p in head.trainable_parameters()], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # evaluation: values only
        torch.testing.assert_close(
            chunked_token_terms(
                hidden,
                (teacher_hidden,),
                targets,
                student_head=head,
                teacher_logits=teacher_logits,
                losses=losses,
                with_label_loss=with_label_loss,
                chunk_size=4,
            ),
            dense.detach(),
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("precision", ["bf16 weights", "fp32 weights under bf16 autocast"])
def test_fused_terms_in_low_precision_match_the_fp32_computation(precision):
    """The head's weight gradient is taken in the dtype autograd would use (bf16 products, fp32 sums over chunks):
    it stays within bf16 rounding of the same computation in fp32 and comes back in the weight's dtype."""
    torch.manual_seed(0)
    rows, width, vocab = 64, 16, 48
    low_weights = precision == "bf16 weights"
    linear = torch.nn.Linear(width, vocab, bias=False)
    if low_weights:
        linear = linear.to(torch.bfloat16)
    hidden = torch.randn(rows, width).to(torch.bfloat16 if low_weights else torch.float32).requires_grad_()
    teacher_logits = torch.randn(rows, vocab) * 2
    targets = torch.randint(0, vocab, (rows,))
    losses = [get_loss("kl", temperature=2.0)]
    weights = torch.tensor([0.7, 0.3])

    reference = torch.nn.Linear(width, vocab, bias=False)
    reference.weight.data = linear.weight.detach().float().clone()
    reference_hidden = hidden.detach().float().requires_grad_()
    dense = _dense_terms(reference_hidden, LogitsHead(_TinyLM(reference)), teacher_logits, targets, losses, True)
    (dense * weights).sum().backward()

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not low_weights):
        sums = chunked_token_terms(
            hidden,
            (teacher_logits,),
            targets,
            student_head=LogitsHead(_TinyLM(linear)),
            teacher_logits=lambda rows: rows,
            losses=losses,
            with_label_loss=True,
            chunk_size=16,
            weights=weights,
        )
        (sums * weights).sum().backward()
    assert linear.weight.grad.dtype == linear.weight.dtype
    torch.testing.assert_close(sums, dense.detach(), rtol=2e-2, atol=1e-2)
    torch.testing.assert_close(linear.weight.grad.float(), reference.weight.grad, rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(hidden.grad.float(), reference_hidden.grad, rtol=3e-2, atol=3e-2)


def distillation_sums(hidden, teacher_logits, head, losses, **options):
    """``chunked_token_terms`` in chunks of 4 with the teacher's logits given row by row and no label loss."""
    return chunked_token_terms(
        hidden,
        (teacher_logits,),
        None,
        student_head=head,
        teacher_logits=lambda rows: rows,
        losses=losses,
        with_label_loss=False,
        chunk_size=4,
        **options,
    )


def test_fused_terms_with_masked_vocabulary_entries_stay_finite_and_exact():
    # Entries at -inf in both models (a masked vocabulary): 0·log 0 is 0 in values and gradients, as in the plain path.
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 16)
    with torch.no_grad():
        linear.bias[:3] = -math.inf
    head = LogitsHead(_TinyLM(linear))
    hidden, teacher = torch.randn(9, 8, requires_grad=True), torch.randn(9, 16)
    teacher[:, :3] = -math.inf
    losses = [get_loss(name) for name in ("kl", "reverse_kl", "jsd", "soft_ce")]
    weights = torch.ones(4)
    dense = _dense_terms(hidden, head, teacher, None, losses, False)
    dense.sum().backward()
    expected = (hidden.grad, linear.weight.grad, linear.bias.grad)
    hidden.grad = linear.weight.grad = linear.bias.grad = None
    sums = distillation_sums(hidden, teacher, head, losses, weights=weights)
    sums.sum().backward()
    torch.testing.assert_close(sums, dense.detach())
    for got, want in zip((hidden.grad, linear.weight.grad, linear.bias.grad), expected):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_fused_terms_refuse_a_backward_pass_with_other_weights():
    torch.manual_seed(0)
    head = LogitsHead(_TinyLM(torch.nn.Linear(8, 16)))
    hidden = torch.randn(5, 8, requires_grad=True)
    sums = chunked_token_terms(
        hidden,
        (torch.randn(5, 16),),
        torch.randint(0, 16, (5,)),
        student_head=head,
        teacher_logits=lambda rows: rows,
        losses=[get_loss("kl")],
        with_label_loss=True,
        chunk_size=4,
        weights=torch.tensor([0.5, 1.0]),
    )
    with pytest.raises(RuntimeError, match=r"computed its gradients for the term weights \[0.5, 1.0\]"):
        sums[1].backward()  # the kl alone: its gradient was never computed on its own


@pytest.mark.parametrize("path", ["fused", "recomputed", "values"])
def test_thresholded_losses_count_their_confident_positions_once_on_every_path(path):
    # 10 positions in chunks of 4 (the last one short); the count is the teacher's positions with a top-class
    # probability at or above each loss's threshold, for the thresholded losses only, however the chunks run.
    torch.manual_seed(0)
    head = LogitsHead(_TinyLM(torch.nn.Linear(8, 16)))
    hidden, teacher = torch.randn(10, 8, requires_grad=True), torch.randn(10, 16) * 3
    top = teacher.softmax(-1).amax(-1).sort(descending=True).values
    thresholds = (float(top[4] + top[5]) / 2, float(top[6] + top[7]) / 2)  # 5 and 7 positions kept, no tie
    losses = [
        get_loss("kl", confidence_threshold=thresholds[0]),
        get_loss("tvd"),
        get_loss("jsd", confidence_threshold=thresholds[1]),
    ]
    counts = torch.full((3,), 100.0)  # added to, not overwritten
    sums = distillation_sums(
        hidden if path != "values" else hidden.detach(),
        teacher,
        head,
        losses,
        weights=torch.ones(3) if path == "fused" else None,
        confident_counts=counts,
    )
    if path != "values":
        sums.sum().backward()  # the recomputed path runs its chunks again here: not counted twice
    assert counts.tolist() == [105, 100, 107]
