"""Response-based losses against hand-written references on fixed tensors."""

import math

import numpy as np
import pytest
import torch

from hf_kd.losses import functional as F

STUDENT = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], dtype=torch.float64)
TEACHER = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]], dtype=torch.float64)


def softmax(z, tau=1.0):
    z = np.asarray(z, dtype=np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(p, q):
    return float(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0))


def per_row(fn, student=STUDENT, teacher=TEACHER):
    return [fn(s, t) for s, t in zip(student.numpy(), teacher.numpy())]


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_forward_and_reverse_kl(tau):
    forward = per_row(lambda s, t: tau**2 * kl(softmax(t, tau), softmax(s, tau)))
    reverse = per_row(lambda s, t: tau**2 * kl(softmax(s, tau), softmax(t, tau)))
    assert F.forward_kl(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(np.mean(forward), rel=1e-6)
    assert F.reverse_kl(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(np.mean(reverse), rel=1e-6)
    assert F.forward_kl(STUDENT, TEACHER, temperature=tau, reduction="sum").item() == pytest.approx(sum(forward))


def test_generalized_jsd_reference_and_endpoints():
    beta = 0.3

    def reference(s, t):
        p_s, p_t = softmax(s), softmax(t)
        m = beta * p_t + (1 - beta) * p_s
        return beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)

    got = F.generalized_jsd(STUDENT, TEACHER, beta=beta).item()
    assert got == pytest.approx(np.mean(per_row(reference)), rel=1e-6)
    assert F.generalized_jsd(STUDENT, TEACHER, beta=0.0).item() == pytest.approx(F.forward_kl(STUDENT, TEACHER).item())
    assert F.generalized_jsd(STUDENT, TEACHER, beta=1.0).item() == pytest.approx(F.reverse_kl(STUDENT, TEACHER).item())
    # β = 0.5 is the ordinary (symmetric) Jensen-Shannon divergence.
    swapped = F.generalized_jsd(TEACHER, STUDENT, beta=0.5).item()
    assert F.generalized_jsd(STUDENT, TEACHER, beta=0.5).item() == pytest.approx(swapped)


def test_skew_kl_and_skew_reverse_kl():
    a = 0.1
    forward = per_row(lambda s, t: kl(softmax(t), a * softmax(t) + (1 - a) * softmax(s)))
    reverse = per_row(lambda s, t: kl(softmax(s), (1 - a) * softmax(t) + a * softmax(s)))
    assert F.skew_kl(STUDENT, TEACHER, skew=a).item() == pytest.approx(np.mean(forward), rel=1e-6)
    assert F.skew_reverse_kl(STUDENT, TEACHER, skew=a).item() == pytest.approx(np.mean(reverse), rel=1e-6)
    # skew 0 is plain KL.
    assert F.skew_kl(STUDENT, TEACHER, skew=0.0).item() == pytest.approx(F.forward_kl(STUDENT, TEACHER).item())


def test_tvd_soft_ce_logit_mse():
    tau = 2.0
    tvd = per_row(lambda s, t: 0.5 * np.abs(softmax(t, tau) - softmax(s, tau)).sum())
    soft_ce = per_row(lambda s, t: -(tau**2) * (softmax(t, tau) * np.log(softmax(s, tau))).sum())
    mse = per_row(lambda s, t: np.mean(((s - t) / tau) ** 2))
    assert F.tvd(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(np.mean(tvd), rel=1e-6)
    assert F.soft_ce(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(np.mean(soft_ce), rel=1e-6)
    assert F.logit_mse(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(np.mean(mse), rel=1e-6)


def test_prob_mse_is_the_mean_teachers_softmax_mse():
    tau = 2.0
    # The mean teacher's softmax_mse_loss: Σ over classes of (p_S − p_T)², divided by the number of classes.
    reference = per_row(lambda s, t: ((softmax(s, tau) - softmax(t, tau)) ** 2).sum() / s.shape[-1])
    assert F.prob_mse(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(np.mean(reference), rel=1e-6)
    assert F.prob_mse(TEACHER, TEACHER).item() == 0.0
    # Bounded: two one-hot distributions on different classes are 2/C apart.
    far = F.prob_mse(torch.tensor([[100.0, 0.0, 0.0, 0.0]]), torch.tensor([[0.0, 100.0, 0.0, 0.0]]))
    assert far.item() == pytest.approx(2 / 4, rel=1e-6)


def test_dkd_reference():
    tau, alpha, beta = 2.0, 1.0, 8.0
    target = torch.tensor([1, 2])

    def reference(s, t, y):
        p_s, p_t = softmax(s, tau), softmax(t, tau)
        b_s, b_t = [p_s[y], 1 - p_s[y]], [p_t[y], 1 - p_t[y]]
        rest = [c for c in range(len(s)) if c != y]
        n_s, n_t = softmax(s[rest], tau), softmax(t[rest], tau)
        return tau**2 * (alpha * kl(b_t, b_s) + beta * kl(n_t, n_s))

    expected = np.mean([reference(s, t, y) for s, t, y in zip(STUDENT.numpy(), TEACHER.numpy(), target.tolist())])
    got = F.dkd(STUDENT, TEACHER, target=target, alpha=alpha, beta=beta, temperature=tau).item()
    assert got == pytest.approx(expected, rel=1e-6)
    # Unlabeled positions (-100) use the teacher's top class.
    unlabeled = F.dkd(STUDENT, TEACHER, target=torch.tensor([-100, -100]), temperature=tau).item()
    assert unlabeled == pytest.approx(F.dkd(STUDENT, TEACHER, target=TEACHER.argmax(-1), temperature=tau).item())


LOSSES = sorted(F.RESPONSE_FUNCTIONS.items())
DIVERGENCES = [(name, fn) for name, fn in LOSSES if name != "soft_ce"]  # soft CE equals H(p_T) at S = T


@pytest.mark.parametrize(("name", "fn"), DIVERGENCES)
def test_zero_on_identical_inputs(name, fn):
    logits = torch.randn(4, 7, 11)
    assert fn(logits, logits.clone(), temperature=2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_soft_ce_equals_kl_plus_teacher_entropy():
    tau = 3.0
    entropy = np.mean([-(softmax(t, tau) * np.log(softmax(t, tau))).sum() for t in TEACHER.numpy()])
    expected = F.forward_kl(STUDENT, TEACHER, temperature=tau).item() + tau**2 * entropy
    assert F.soft_ce(STUDENT, TEACHER, temperature=tau).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("name", "fn"), LOSSES)
def test_mask_selects_positions_token_level(name, fn):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    masked = fn(student, teacher, mask=mask, temperature=2.0)
    kept = fn(student[mask], teacher[mask], temperature=2.0)
    assert masked.item() == pytest.approx(kept.item(), rel=1e-5)
    total = fn(student, teacher, mask=mask, temperature=2.0, reduction="sum")
    assert total.item() == pytest.approx(kept.item() * int(mask.sum()), rel=1e-5)


@pytest.mark.parametrize(("name", "fn"), LOSSES)
def test_gradient_reaches_student_and_a_teacher_only_when_it_asks(name, fn):
    # The functions are plain differentiable math: a detached teacher (what every teacher source hands over, tested
    # through LiveTeacher in test_config_and_registry) gets nothing, one that requires grad (peers) gets gradients.
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6, requires_grad=True)
    fn(student, teacher.detach(), temperature=2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    fn(student.detach(), teacher, temperature=2.0).backward()
    assert teacher.grad is not None and teacher.grad.abs().sum() > 0


@pytest.mark.parametrize(("name", "fn"), LOSSES)
def test_no_nan_with_minus_inf_masked_vocab(name, fn):
    # Vocabulary entries both models mask with -inf (e.g. padded vocab) must not poison values or gradients.
    student = torch.randn(2, 4, 8)
    teacher = torch.randn(2, 4, 8)
    student[..., -2:] = float("-inf")
    teacher[..., -2:] = float("-inf")
    student.requires_grad_(True)
    loss = fn(student, teacher, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize(("name", "fn"), LOSSES)
def test_low_precision_inputs_upcast(name, fn):
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator)
    full = fn(student, teacher, temperature=2.0)
    half = fn(student.bfloat16(), teacher.bfloat16(), temperature=2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(full.item(), rel=5e-2, abs=1e-3)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        F.forward_kl(STUDENT, TEACHER, temperature=0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        F.forward_kl(STUDENT, TEACHER[:, :2])
    with pytest.raises(ValueError, match="beta"):
        F.generalized_jsd(STUDENT, TEACHER, beta=1.5)
    with pytest.raises(ValueError, match="mask shape"):
        F.forward_kl(STUDENT, TEACHER, mask=torch.ones(3, dtype=torch.bool))


def test_fused_kl_gradients_match_finite_differences():
    # forward_kl writes its gradient out, (q − p)/τ per position; gradcheck compares it with finite differences.
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(2, 3, 7, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    assert torch.autograd.gradcheck(lambda s: F.forward_kl(s, teacher, temperature=2.0, mask=mask), (student,))
    reference = F.forward_kl(student, teacher.clone().requires_grad_(), temperature=2.0, mask=mask)  # autograd path
    assert F.forward_kl(student, teacher, temperature=2.0, mask=mask).item() == pytest.approx(reference.item())


@pytest.mark.parametrize("loss", ["sparse_forward_kl", "sparse_soft_ce"])
def test_sparse_teacher_gradients_match_finite_differences(loss):
    from hf_kd.features import SparseDistribution

    generator = torch.Generator().manual_seed(0)
    student = torch.randn(4, 9, dtype=torch.float64, generator=generator, requires_grad=True)
    kept = torch.randn(4, 3, dtype=torch.float64, generator=generator).log_softmax(-1) - 0.5  # tail mass e^-0.5
    teacher = SparseDistribution(
        ids=torch.tensor([[0, 4, 8], [1, 2, 3], [7, 6, 5], [0, 1, 2]]),
        logprobs=kept,
        fill=torch.log((1 - kept.exp().sum(-1)) / 6),
        vocab_size=9,
    )
    function = getattr(F, loss)
    assert torch.autograd.gradcheck(lambda s: function(s, teacher, temperature=1.5), (student,))
    dense = F.forward_kl if loss == "sparse_forward_kl" else F.soft_ce
    expected = dense(student, teacher.dense(), temperature=1.5)
    assert function(student, teacher, temperature=1.5).item() == pytest.approx(expected.item(), rel=1e-9)
