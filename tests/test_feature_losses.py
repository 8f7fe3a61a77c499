"""Intermediate, relation-based and mutual-information losses: references, invariances, layer maps, projectors."""

import numpy as np
import pytest
import torch

from hf_kd import ModelFeatures, get_loss
from hf_kd.features import pool, resolve_layer_map
from hf_kd.losses import functional as F

torch.manual_seed(0)
S_EMB = torch.randn(5, 4, dtype=torch.float64)
T_EMB = torch.randn(5, 6, dtype=torch.float64)


def huber(a, b):
    d = np.abs(a - b)
    return float(np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5)))


def distances(x):
    x = np.asarray(x)
    return np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))


# ---- relation: references -------------------------------------------------------------------------------------


def test_rkd_distance_reference():
    def normalised(x):
        d = distances(x)
        return d / d[~np.eye(len(d), dtype=bool)].mean()

    expected = huber(normalised(S_EMB), normalised(T_EMB))
    assert F.rkd_distance(S_EMB, T_EMB).item() == pytest.approx(expected, rel=1e-5)


def test_rkd_angle_reference():
    def angles(x):
        x = np.asarray(x)
        out = np.zeros((len(x), len(x), len(x)))
        for i in range(len(x)):
            for j in range(len(x)):
                for k in range(len(x)):
                    a, b = x[j] - x[i], x[k] - x[i]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    out[i, j, k] = (a / na) @ (b / nb) if na > 0 and nb > 0 else 0.0
        return out

    assert F.rkd_angle(S_EMB, T_EMB).item() == pytest.approx(huber(angles(S_EMB), angles(T_EMB)), rel=1e-5)


def test_similarity_preserving_reference():
    def gram(x):
        g = np.asarray(x) @ np.asarray(x).T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    expected = ((gram(T_EMB) - gram(S_EMB)) ** 2).sum() / 25
    assert F.similarity_preserving(S_EMB, T_EMB).item() == pytest.approx(expected, rel=1e-6)


def test_pkt_reference():
    def affinity(x):
        x = np.asarray(x) / np.linalg.norm(x, axis=1, keepdims=True)
        a = (x @ x.T + 1) / 2
        return a / a.sum(1, keepdims=True)

    p_t, p_s = affinity(T_EMB), affinity(S_EMB)
    expected = np.mean(p_t * np.log((p_t + 1e-7) / (p_s + 1e-7)))
    assert F.pkt(S_EMB, T_EMB).item() == pytest.approx(expected, rel=1e-5)


def test_irg_reference_with_cross_layer_edges():
    s_layers, t_layers = [S_EMB, S_EMB * 2 + 1], [T_EMB, T_EMB.flip(0)]

    def graph(x):
        d = distances(x)
        return d / d[~np.eye(len(d), dtype=bool)].mean()

    g_s, g_t = [graph(x) for x in s_layers], [graph(x) for x in t_layers]
    edges = np.mean([np.mean((a - b) ** 2) for a, b in zip(g_s, g_t)])
    transition = np.mean(((g_s[1] - g_s[0]) - (g_t[1] - g_t[0])) ** 2)
    got = F.irg(s_layers, t_layers, cross_layer_weight=0.5).item()
    assert got == pytest.approx(edges + 0.5 * transition, rel=1e-5)


def test_info_nce_reference():
    s, t = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    sn, tn = s.numpy() / np.linalg.norm(s, axis=1, keepdims=True), t.numpy() / np.linalg.norm(t, axis=1, keepdims=True)
    logits = sn @ tn.T / 0.1
    expected = np.mean([-(logits[i, i] - np.log(np.exp(logits[i]).sum())) for i in range(4)])
    assert F.info_nce(s, t, temperature=0.1).item() == pytest.approx(expected, rel=1e-6)


# ---- relation: what the math promises ------------------------------------------------------------------------


def test_rkd_distance_invariant_to_scaling_and_zero_on_identical():
    assert F.rkd_distance(S_EMB * 7.5, T_EMB).item() == pytest.approx(F.rkd_distance(S_EMB, T_EMB).item(), rel=1e-6)
    assert F.rkd_distance(S_EMB, S_EMB * 3).item() == pytest.approx(0.0, abs=1e-10)


def test_rkd_angle_invariant_to_translation_and_scaling():
    shifted = F.rkd_angle(S_EMB + torch.tensor([3.0, -1.0, 2.0, 5.0], dtype=torch.float64), T_EMB)
    assert shifted.item() == pytest.approx(F.rkd_angle(S_EMB, T_EMB).item(), rel=1e-6)
    assert F.rkd_angle(S_EMB, S_EMB * 2 + 1).item() == pytest.approx(0.0, abs=1e-10)


def test_similarity_preserving_invariant_to_global_scaling():
    # Row normalisation removes a scale common to all rows; per-row scales c_i also scale column j by c_j,
    # so only global (and per-side) scaling is promised.
    assert F.similarity_preserving(S_EMB * 4, T_EMB * 0.1).item() == pytest.approx(
        F.similarity_preserving(S_EMB, T_EMB).item(), rel=1e-6
    )
    assert F.similarity_preserving(S_EMB, S_EMB * 2).item() == pytest.approx(0.0, abs=1e-12)


def test_pkt_zero_on_identical_and_nonnegative():
    assert F.pkt(S_EMB, S_EMB * 5).item() == pytest.approx(0.0, abs=1e-7)
    assert F.pkt(S_EMB, T_EMB).item() > 0


# ---- intermediate: references --------------------------------------------------------------------------------


def test_feature_mse_and_cosine_mask_padding_tokens():
    s, t = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    rows = [(b, i) for b in range(2) for i in range(4) if mask[b, i]]
    mse = np.mean([np.mean((s[b, i].numpy() - t[b, i].numpy()) ** 2) for b, i in rows])
    cos = np.mean([1 - s[b, i] @ t[b, i] / (s[b, i].norm() * t[b, i].norm()) for b, i in rows])
    assert F.feature_mse(s, t, token_mask=mask).item() == pytest.approx(mse, rel=1e-6)
    assert F.feature_cosine(s, t, token_mask=mask).item() == pytest.approx(float(cos), rel=1e-6)


def test_attention_losses_reference_and_head_averaging():
    s = torch.softmax(torch.randn(2, 2, 3, 3, dtype=torch.float64), -1)
    t = torch.softmax(torch.randn(2, 4, 3, 3, dtype=torch.float64), -1)
    s_mean, t_mean = s.mean(1).numpy(), t.mean(1).numpy()  # head counts differ → averaged
    mse = np.mean((s_mean - t_mean) ** 2)
    kl = np.mean((t_mean * np.log(t_mean / s_mean)).sum(-1))
    assert F.attention_mse(s, t).item() == pytest.approx(mse, rel=1e-6)
    assert F.attention_kl(s, t).item() == pytest.approx(kl, rel=1e-6)
    assert F.attention_kl(t, t).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_losses_compare_the_keys_the_students_attention_dropout_kept():
    # One query row of 4 keys; dropout (p = 0.5) zeroed key 1 and doubled the others, as transformers returns it.
    student_softmax = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    dropped = student_softmax * torch.tensor([2.0, 0.0, 2.0, 2.0])
    teacher = torch.tensor([0.25, 0.25, 0.4, 0.1], dtype=torch.float64)
    # By hand, over keys 0, 2, 3: the student's softmax and the teacher's row, each renormalised there.
    s_kept, t_kept = np.array([0.1, 0.3, 0.4]) / 0.8, np.array([0.25, 0.4, 0.1]) / 0.75
    kl = np.sum(t_kept * np.log(t_kept / s_kept))
    mse = np.sum((s_kept - t_kept) ** 2) / 4  # the dropped key counts as equal on both sides
    as_maps = lambda row: row.view(1, 1, 1, 4)  # noqa: E731
    assert F.attention_kl(as_maps(dropped), as_maps(teacher)).item() == pytest.approx(kl, rel=1e-6)
    assert F.attention_mse(as_maps(dropped), as_maps(teacher)).item() == pytest.approx(mse, rel=1e-6)
    # Without dropout nothing changes: the plain KL and MSE of the two rows.
    plain_kl = np.sum(teacher.numpy() * np.log(teacher.numpy() / student_softmax.numpy()))
    assert F.attention_kl(as_maps(student_softmax), as_maps(teacher)).item() == pytest.approx(plain_kl, rel=1e-6)


def test_attention_losses_leave_the_sink_keys_out_of_both_rows():
    # One query row of 4 keys: both sides park mass on key 0 (the sink); sink_keys=1 compares keys 1..3 only.
    student = torch.tensor([0.5, 0.1, 0.1, 0.3], dtype=torch.float64)
    teacher = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    s_rest, t_rest = np.array([0.1, 0.1, 0.3]) / 0.5, np.array([0.3, 0.2, 0.1]) / 0.6
    kl = np.sum(t_rest * np.log(t_rest / s_rest))
    mse = np.sum((s_rest - t_rest) ** 2) / 4  # the left-out key counts as equal on both sides
    as_maps = lambda row, heads=1: row.repeat(heads).view(1, heads, 1, 4)  # noqa: E731
    assert F.attention_kl(as_maps(student), as_maps(teacher), sink_keys=1).item() == pytest.approx(kl, rel=1e-6)
    assert F.attention_mse(as_maps(student), as_maps(teacher), sink_keys=1).item() == pytest.approx(mse, rel=1e-6)
    # With other head counts the teacher's rows are renormalised over the same keys before the heads are averaged.
    assert F.attention_kl(as_maps(student), as_maps(teacher, 3), sink_keys=1).item() == pytest.approx(kl, rel=1e-6)
    # A row that differs only in its sink mass (here 0.9 against 0.4) costs nothing once the sink is left out.
    parked = torch.tensor([0.9, 0.05, 0.1 / 3, 0.05 / 3], dtype=torch.float64)
    assert F.attention_kl(as_maps(parked), as_maps(teacher), sink_keys=1).item() == pytest.approx(0.0, abs=1e-12)
    assert F.attention_kl(as_maps(parked), as_maps(teacher)).item() > 0.1


def test_attention_losses_take_sink_keys_as_a_loss_option_and_refuse_bad_values():
    from hf_kd.config import parse_losses

    (spec,) = parse_losses("attention_kl:1.0:sink_keys=1")
    assert get_loss(spec.name, **spec.options).sink_keys == 1
    assert get_loss("attention_mse", sink_keys=2).sink_keys == 2
    assert get_loss("attention_kl").sink_keys == 0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=rf"sink_keys must be a non-negative integer .*, got {bad!r}"):
            get_loss("attention_kl", sink_keys=bad)


def test_attention_kl_of_a_bert_in_training_mode_against_itself_is_zero():
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.5, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = BertModel(config)
    ids, mask = torch.randint(0, 50, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    mask[0, 5:] = 0
    model.eval()
    with torch.no_grad():
        teacher = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    model.train()  # the same weights, with attention dropout: the returned weights have dropped entries
    student = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert (student[0][mask[:, None, :, None].expand_as(student[0]).bool() & (student[0] == 0)]).numel() > 0
    token_mask = mask.bool()
    assert F.attention_kl(student[0], teacher[0], token_mask=token_mask).item() == pytest.approx(0.0, abs=1e-6)
    assert F.attention_mse(student[0], teacher[0], token_mask=token_mask).item() == pytest.approx(0.0, abs=1e-9)


def test_pkd_reference():
    s, t = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    expected = np.mean(
        [np.sum((a / np.linalg.norm(a) - b / np.linalg.norm(b)) ** 2) for a, b in zip(s.numpy(), t.numpy())]
    )
    assert F.pkd(s, t).item() == pytest.approx(expected, rel=1e-6)
    assert F.pkd(s, s * 3).item() == pytest.approx(0.0, abs=1e-12)


def test_attention_transfer_reference_pools_maps_and_ignores_width():
    s, t = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 8, 2, 2, dtype=torch.float64)
    s_pooled = torch.nn.functional.adaptive_avg_pool2d(s, (2, 2)).numpy()

    def at(x):
        q = (np.abs(x) ** 2).mean(1).reshape(len(x), -1)
        return q / np.linalg.norm(q, axis=1, keepdims=True)

    expected = np.mean((at(s_pooled) - at(t.numpy())) ** 2)
    assert F.attention_transfer(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_fsp_reference():
    s = [torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)]
    t = [torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 2, 2, dtype=torch.float64)]

    def gram(a, b):
        size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
        a = torch.nn.functional.adaptive_avg_pool2d(a, size).numpy().reshape(2, a.shape[1], -1)
        b = torch.nn.functional.adaptive_avg_pool2d(b, size).numpy().reshape(2, b.shape[1], -1)
        return a @ b.transpose(0, 2, 1) / a.shape[-1]

    expected = np.mean((gram(*s) - gram(*t)) ** 2)
    assert F.fsp(s, t).item() == pytest.approx(expected, rel=1e-6)


def test_vid_reference():
    t, mu = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, 4, dtype=torch.float64)
    var = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    expected = 0.5 * np.mean((t.numpy() - mu.numpy()) ** 2 / var.numpy() + np.log(var.numpy()))
    assert F.vid(t, mu, var).item() == pytest.approx(expected, rel=1e-6)


# ---- layer maps, pooling, projectors ---------------------------------------------------------------------------


def test_layer_maps():
    assert resolve_layer_map("uniform", 2, 6) == [(1, 3), (2, 6)]
    assert resolve_layer_map("uniform", 3, 12) == [(1, 4), (2, 8), (3, 12)]
    assert resolve_layer_map("last", 2, 6) == [(2, 6)]
    assert resolve_layer_map([[0, 0], [2, 5]], 2, 6) == [(0, 0), (2, 5)]
    with pytest.raises(ValueError, match=r"pair \[3, 4\] is out of range: the student has layers 0..2"):
        resolve_layer_map([[3, 4]], 2, 6)
    with pytest.raises(ValueError, match="teacher 0..6"):
        resolve_layer_map([[1, 7]], 2, 6)
    with pytest.raises(ValueError, match="layer_map must be"):
        resolve_layer_map("middle", 2, 6)
    assert resolve_layer_map(np.array([[0, 0], [2, 5]]).tolist(), 2, 6) == [(0, 0), (2, 5)]
    assert resolve_layer_map([(np.int64(1), np.int64(3))], 2, 6) == [(1, 3)]  # numpy integers, as plain ints
    for bad in ([[1, 2.5]], [[1, -1]], [[True, 2]], [[1, 2, 3]]):
        with pytest.raises(ValueError, match=r"layer_map entries are \[student_layer, teacher_layer\] pairs"):
            resolve_layer_map(bad, 2, 6)


def test_pooling():
    tokens = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(tokens, "cls"), tokens[:, 0])
    assert torch.equal(pool(tokens, "last", mask), torch.stack([tokens[0, 1], tokens[1, 2]]))
    assert torch.allclose(pool(tokens, "mean", mask)[0], tokens[0, :2].mean(0))
    maps = torch.randn(2, 3, 4, 4)
    assert torch.allclose(pool(maps, "auto"), maps.mean((2, 3)))
    assert pool(maps, "flatten").shape == (2, 48)
    with pytest.raises(ValueError, match="pooling must be one of"):
        pool(tokens, "max")


def test_width_mismatch_without_projector_names_both_widths_and_the_option():
    student = ModelFeatures(hidden_states=(torch.randn(2, 3, 8), torch.randn(2, 3, 8)))
    teacher = ModelFeatures(hidden_states=(torch.randn(2, 3, 16), torch.randn(2, 3, 16)))
    with pytest.raises(
        ValueError, match="student's features are 8 wide and the teacher's 16; set the loss option projector='linear'"
    ):
        get_loss("hidden_mse").setup(student, teacher)
    loss = get_loss("hidden_mse", projector="linear")
    loss.setup(student, teacher)
    assert isinstance(loss.projectors[0].net, torch.nn.Linear) and loss.projectors[0].net.in_features == 8
    loss(student, teacher).backward()
    assert loss.projectors[0].net.weight.grad is not None


def test_hint_uses_a_1x1_convolution_on_feature_maps():
    student = ModelFeatures(hidden_states=(torch.randn(2, 4, 6, 6),))
    teacher = ModelFeatures(hidden_states=(torch.randn(2, 9, 6, 6),))
    loss = get_loss("hint")
    loss.setup(student, teacher)
    conv = loss.projectors[0].net
    assert isinstance(conv, torch.nn.Conv2d) and conv.kernel_size == (1, 1) and conv.out_channels == 9
    assert torch.isfinite(loss(student, teacher))


def test_crd_needs_sample_indices_and_updates_its_memory():
    student = ModelFeatures(hidden_states=(torch.randn(4, 3, 8),))
    teacher = ModelFeatures(hidden_states=(torch.randn(4, 3, 16),))
    loss = get_loss("crd", num_negatives=5, pooling="cls")
    with pytest.raises(ValueError, match="training set size"):
        loss.setup(student, teacher, num_samples=None)
    loss.setup(student, teacher, num_samples=20)
    with pytest.raises(ValueError, match="add_sample_index"):
        loss(student, teacher)
    banks = {"student": loss.student_memory.clone(), "teacher": loss.teacher_memory.clone()}
    index = torch.tensor([0, 3, 7, 19])
    torch.manual_seed(7)
    value = loss(student, teacher, sample_index=index)
    # By hand: each side's normalised head output picks its row among [positive, the same 5 drawn negatives].
    torch.manual_seed(7)
    candidates = torch.cat([index[:, None], torch.randint(0, 20, (4, 5))], dim=1)
    normalize = torch.nn.functional.normalize
    with torch.no_grad():
        s = normalize(loss.student_head(student.hidden_states[0][:, 0]), dim=1)
        t = normalize(loss.teacher_head(teacher.hidden_states[0][:, 0]), dim=1)
    target = torch.zeros(4, dtype=torch.long)

    def contrast(anchors, bank):
        return torch.nn.functional.cross_entropy(torch.einsum("bd,bkd->bk", anchors, bank[candidates]) / 0.07, target)

    expected = contrast(s, banks["teacher"]) + contrast(t, banks["student"])
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    # Momentum 0.5 updates exactly the batch's rows, re-normalised.
    assert torch.allclose(loss.teacher_memory[index], normalize(0.5 * banks["teacher"][index] + 0.5 * t, dim=1))
    assert torch.allclose(loss.student_memory[index], normalize(0.5 * banks["student"][index] + 0.5 * s, dim=1))
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(loss.teacher_memory[untouched], banks["teacher"][untouched])


def test_crd_evaluates_with_in_batch_negatives_and_leaves_its_memory_alone():
    student = ModelFeatures(hidden_states=(torch.randn(4, 3, 8),))
    teacher = ModelFeatures(hidden_states=(torch.randn(4, 3, 16),))
    loss = get_loss("crd", num_negatives=5, nce_temperature=0.5, pooling="cls")
    loss.setup(student, teacher, num_samples=20)
    banks = [loss.student_memory.clone(), loss.teacher_memory.clone()]
    loss.eval()
    value = loss(student, teacher)  # held-out rows: no sample_index needed
    s = torch.nn.functional.normalize(loss.student_head(student.hidden_states[0][:, 0]), dim=1)
    t = torch.nn.functional.normalize(loss.teacher_head(teacher.hidden_states[0][:, 0]), dim=1)
    targets = torch.arange(4)
    expected = torch.nn.functional.cross_entropy(s @ t.T / 0.5, targets) + torch.nn.functional.cross_entropy(
        t @ s.T / 0.5, targets
    )
    torch.testing.assert_close(value, expected)
    assert torch.equal(loss.student_memory, banks[0]) and torch.equal(loss.teacher_memory, banks[1])


def test_crd_softmax_form_reference():
    student = ModelFeatures(hidden_states=(torch.randn(3, 2, 4),))
    teacher = ModelFeatures(hidden_states=(torch.randn(3, 2, 6),))
    loss = get_loss("crd", feature_dim=5, num_negatives=4, nce_temperature=0.5, pooling="cls")
    loss.setup(student, teacher, num_samples=10)
    index = torch.tensor([2, 5, 9])
    student_bank, teacher_bank = loss.student_memory.clone(), loss.teacher_memory.clone()
    torch.manual_seed(123)
    value = loss(student, teacher, sample_index=index).item()
    torch.manual_seed(123)
    negatives = torch.randint(0, 10, (3, 4))
    candidates = torch.cat([index[:, None], negatives], 1)
    with torch.no_grad():
        s = torch.nn.functional.normalize(loss.student_head(student.hidden_states[0][:, 0]), dim=1)
        t = torch.nn.functional.normalize(loss.teacher_head(teacher.hidden_states[0][:, 0]), dim=1)

    def nce(anchors, bank):
        total = 0.0
        for row in range(3):
            logits = (bank[candidates[row]] @ anchors[row]).numpy() / 0.5
            total += -(logits[0] - np.log(np.exp(logits).sum()))
        return total / 3

    assert value == pytest.approx(nce(s, teacher_bank) + nce(t, student_bank), rel=1e-5)
    # the rows just seen were pulled towards this batch's embeddings: 0.5·old + 0.5·new, renormalised
    expected_row = torch.nn.functional.normalize(0.5 * teacher_bank[2] + 0.5 * t[0], dim=0)
    torch.testing.assert_close(loss.teacher_memory[2], expected_row)


def test_crd_scores_a_small_bank_with_one_matmul_and_a_large_one_by_rows_with_equal_values_and_gradients():
    loss = get_loss("crd", nce_temperature=0.5)
    normalize = torch.nn.functional.normalize
    anchors = normalize(torch.randn(3, 4), dim=1).requires_grad_()
    candidates = torch.tensor([[2, 0, 7], [5, 5, 1], [9, 3, 8]])  # column 0 the positive
    target = torch.zeros(3, dtype=torch.long)
    for size in (10, 13):  # 10 <= 4·3 columns: the matmul path; 13 > 12: the rows are gathered
        bank = normalize(torch.randn(size, 4), dim=1)
        value = loss._contrast_bank(anchors, bank, candidates)
        (gradient,) = torch.autograd.grad(value, anchors)
        # By hand: a softmax over each anchor's dot products with its candidate rows, / τ.
        logits = torch.stack([bank[candidates[row]] @ anchors[row] for row in range(3)]) / 0.5
        expected = torch.nn.functional.cross_entropy(logits, target)
        (expected_gradient,) = torch.autograd.grad(expected, anchors)
        torch.testing.assert_close(value, expected)
        torch.testing.assert_close(gradient, expected_gradient)


def test_hint_is_half_the_feature_mse_through_its_regressor():
    student = ModelFeatures(hidden_states=(torch.randn(2, 3, 4), torch.randn(2, 3, 4)), attention_mask=None)
    teacher = ModelFeatures(hidden_states=(torch.randn(2, 3, 6), torch.randn(2, 3, 6)))
    loss = get_loss("hint")
    loss.setup(student, teacher)
    with torch.no_grad():
        projected = loss.projectors[0](student.hidden_states[-1])
    expected = 0.5 * ((projected - teacher.hidden_states[-1]) ** 2).mean()
    assert loss(student, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
