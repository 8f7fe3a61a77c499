"""Every causal LM's own logits on the paths that project final hidden states (chunk_size, teachers' token rows).

The sweep is parametrised over transformers' auto mapping of causal LMs (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``): each
class is built from its own config class, shrunk to a tiny size, and either hf_kd's hidden-state path gives exactly its
``forward(...).logits`` or the first-batch check refuses it, naming the class. Classes that do not build tiny on CPU
here are skipped with the reason. CI runs every class whose family transforms its logits, every other class that is
refused and every 8th of the rest; ``HF_KD_ALL_CAUSAL_LMS=1`` runs all of them (~1-3 min on 2 cores).
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import pytest
import torch
import transformers
from conftest import config, lm_data
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from hf_kd import DistillationTrainer
from hf_kd.losses.lm_head import OUTPUT_STEPS, LogitsHead, output_steps

TINY_VOCAB = 96
TINY_SIZES = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "word_embed_proj_dim", "n_embed"), 32),
    **dict.fromkeys(("embedding_dim", "attention_hidden_size"), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "n_inner", "d_ff", "decoder_ffn_dim", "encoder_ffn_dim"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size"), 32),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "decoder_layers", "encoder_layers", "n_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "decoder_attention_heads", "encoder_attention_heads"), 4),
    **dict.fromkeys(("n_heads", "num_key_value_heads"), 4),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "moe_k"), 2),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 128),
    **{"head_dim": 8, "rotary_dim": 4, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4},
    **{"qk_nope_head_dim": 4, "v_head_dim": 8, "n_group": 1, "topk_group": 1, "num_heads": 8},
    **{"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1, "state_size": 8},
    **{"vocab_size": TINY_VOCAB, "unpadded_vocab_size": TINY_VOCAB},
}
# Values other than the defaults (often 1) for the fields the families' output steps read, so the test sees them.
STEP_VALUES = {
    "logits_scaling": 8.0,
    "logit_scale": 0.5,
    "lm_head_multiplier": 0.25,
    "final_logit_softcapping": 3.0,
    "logits_soft_cap": 3.0,
    "output_logit_soft_cap": 3.0,
    "logits_mup_width_multiplier": 4.0,
}
# Causal LMs whose logits go through a prediction head (dense, activation, norm) or a second projection between the
# final hidden states and the output embeddings: hf_kd refuses them on the chunked path (the plain path works).
PREDICTION_HEADS = {
    "BertLMHeadModel",
    "BigBirdForCausalLM",
    "CamembertForCausalLM",
    "Data2VecTextForCausalLM",
    "ElectraForCausalLM",
    "ErnieForCausalLM",
    "MegatronBertForCausalLM",
    "ModernBertDecoderForCausalLM",
    "ProphetNetForCausalLM",
    "RemBertForCausalLM",
    "RoCBertForCausalLM",
    "RoFormerForCausalLM",
    "RobertaForCausalLM",
    "RobertaPreLayerNormForCausalLM",
    "XLMRobertaForCausalLM",
    "XLMRobertaXLForCausalLM",
    "XmodForCausalLM",
}
CAUSAL_LMS = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()))


def _families_with_steps() -> set[str]:
    names = set()
    for name in CAUSAL_LMS:
        model_class = getattr(transformers, name, None)
        if getattr(getattr(model_class, "config_class", None), "model_type", None) in OUTPUT_STEPS:
            names.add(name)
    return names


def _swept() -> list[str]:
    if os.environ.get("HF_KD_ALL_CAUSAL_LMS"):
        return CAUSAL_LMS
    steps = _families_with_steps()
    others = [name for name in CAUSAL_LMS if name not in steps and name not in PREDICTION_HEADS]
    return sorted(steps) + sorted(PREDICTION_HEADS & set(CAUSAL_LMS))[::2] + others[::8]


def _fields(config_class) -> set[str]:
    try:
        return {field.name for field in dataclasses.fields(config_class)}
    except TypeError:
        return set(inspect.signature(config_class.__init__).parameters)


def tiny_config_kwargs(config_class, layers: int = 2) -> dict:
    """Keyword arguments that shrink ``config_class``'s defaults to a tiny model (sub-configs too)."""
    names, defaults = _fields(config_class), config_class()

    def settable(key):
        value = getattr(defaults, key, None)
        return key in names and (value is None or (isinstance(value, int) and not isinstance(value, bool)))

    kwargs = {key: (layers if "layer" in key else value) for key, value in TINY_SIZES.items() if settable(key)}
    kwargs.update({key: value for key, value in STEP_VALUES.items() if key in names})
    for key in names:  # special token ids must fall inside the tiny vocabulary
        value = getattr(defaults, key, None)
        if key.endswith("token_id") and isinstance(value, int) and value >= TINY_VOCAB:
            kwargs[key] = 1
        elif key.endswith("token_id") and isinstance(value, list):
            kwargs[key] = [min(token, 2) for token in value]
    layer_types = getattr(defaults, "layer_types", None)
    if "layer_types" in names and isinstance(layer_types, list | tuple) and layer_types:
        distinct = list(dict.fromkeys(layer_types))  # every kind of layer (hybrid models need an attention layer)
        kwargs["layer_types"] = (distinct * layers)[: max(layers, len(distinct))]
        for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
            if key in kwargs:
                kwargs[key] = len(kwargs["layer_types"])
    for key, sub_config in getattr(config_class, "sub_configs", {}).items():
        if isinstance(sub_config, type) and key in names:
            kwargs[key] = tiny_config_kwargs(sub_config, layers)
    return kwargs


def tiny_causal_lm(name: str, seed: int = 0):
    """``(model, skip reason or None)``: ``name`` built tiny from its config class, run once on CPU."""
    model_class = getattr(transformers, name, None)
    if model_class is None:
        return None, "not exported by transformers"
    error = None
    for layers in (2, 4):  # some hybrid patterns need more than two layers for an attention layer
        try:
            config_kwargs = tiny_config_kwargs(model_class.config_class, layers)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tiny = model_class.config_class(**config_kwargs)
                with torch.device("meta"):
                    size = sum(p.numel() for p in model_class(tiny).parameters())
                if size > 3_000_000:
                    return None, f"does not shrink below 3M parameters from its config ({size:,})"
                torch.manual_seed(seed)
                model = model_class(tiny).eval()
                with torch.no_grad():
                    model(input_ids=torch.randint(3, TINY_VOCAB, (1, 5)))
            return model, None
        except Exception as failure:  # noqa: BLE001  (any failure to build or run tiny is a reason to skip)
            error = failure
    return None, f"does not build tiny on CPU here: {type(error).__name__}: {str(error).splitlines()[0][:160]}"


@pytest.mark.parametrize("name", _swept())
def test_hidden_state_path_gives_the_models_own_logits_or_refuses(name):
    model, reason = tiny_causal_lm(name)
    if model is None:
        pytest.skip(reason)
    ids = torch.randint(3, TINY_VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, output_hidden_states=True)
        try:
            last = model(input_ids=ids, output_hidden_states=True, logits_to_keep=1)
        except TypeError:  # a model without logits_to_keep
            last = full
    head = LogitsHead(model, "the student")
    try:
        own = head(full.hidden_states[-1])
        matches = own.shape == full.logits.shape and torch.allclose(own, full.logits, rtol=1e-5, atol=1e-6)
    except RuntimeError:  # the output embeddings do not even take the final hidden states
        matches = False
    if matches:
        head.check(last.hidden_states[-1][:, -1], last.logits[:, -1])  # the first-batch check lets it through
        assert name not in PREDICTION_HEADS
    else:
        with pytest.raises(ValueError, match=rf"{name} \(model family .*Leave chunk_size unset"):
            head.check(last.hidden_states[-1][:, -1], last.logits[:, -1])
        assert name in PREDICTION_HEADS, f"{name} is refused: its family transforms its logits (OUTPUT_STEPS)"


def _granite(hidden: int, seed: int):
    torch.manual_seed(seed)
    return transformers.GraniteForCausalLM(
        transformers.GraniteConfig(
            vocab_size=64,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            logits_scaling=8.0,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=0,
        )
    )


def _step_loss_and_grads(tmp_path, student, teacher, chunk_size, **overrides):
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        train_dataset=lm_data(n=6),
        args=config(tmp_path, losses="kl", chunk_size=chunk_size, **overrides),
    )
    batch = {k: torch.tensor(v) for k, v in lm_data(n=6)[:].items()}
    student.zero_grad()
    loss = trainer.compute_loss(student, batch)
    loss.backward()
    return loss.item(), {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


def test_granite_chunked_kl_equals_the_plain_kl(tmp_path):
    # Issue 26: Granite divides its logits by logits_scaling (8); the chunked path projected lm_head(h) alone and its
    # kl came out 64x the plain path's, silently. Now both read the model's own logits.
    student, teacher = _granite(16, seed=2), _granite(32, seed=1)
    hidden = torch.randn(3, 16)
    assert not torch.allclose(student.lm_head(hidden) / 8.0, student.lm_head(hidden))  # the scaling matters here
    for overrides in ({"hard_label_weight": 0.0}, {}):  # the kl alone, then with the label CE
        plain, plain_grads = _step_loss_and_grads(tmp_path / "plain", student, teacher, None, **overrides)
        chunked, chunked_grads = _step_loss_and_grads(tmp_path / "chunked", student, teacher, 4, **overrides)
        assert chunked == pytest.approx(plain, rel=1e-5)
        for name, grad in plain_grads.items():
            torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_a_student_whose_logits_differ_is_refused_on_the_first_batch(tmp_path):
    # BERT as a decoder: a dense + GELU + LayerNorm prediction head sits before its output embeddings.
    bert = transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, is_decoder=True
    )
    student = transformers.BertLMHeadModel(bert)
    teacher = _granite(16, seed=1)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=lm_data(n=4), args=config(tmp_path, chunk_size=4)
    )
    batch = {k: torch.tensor(v) for k, v in lm_data(n=4)[:].items()}
    with pytest.raises(ValueError, match=r"the student's own logits .*BertLMHeadModel \(model family 'bert'\)"):
        trainer.compute_loss(student, batch)


def test_a_teacher_whose_logits_differ_is_refused_on_the_first_batch(tmp_path):
    student = _granite(16, seed=2)
    teacher = _granite(32, seed=1)
    teacher.config.logits_scaling = 1.0  # what hf_kd reads ...
    teacher.forward = _scaled_forward(teacher, 8.0)  # ... but this teacher's forward still divides by 8
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, train_dataset=lm_data(n=4), args=config(tmp_path, chunk_size=4)
    )
    batch = {k: torch.tensor(v) for k, v in lm_data(n=4)[:].items()}
    with pytest.raises(ValueError, match=r"the teacher's own logits .*GraniteForCausalLM \(model family 'granite'\)"):
        trainer.compute_loss(student, batch)


def _scaled_forward(model, divisor):
    forward = model.forward

    def scaled(*args, **kwargs):
        outputs = forward(*args, **kwargs)
        outputs.logits = outputs.logits / divisor
        return outputs

    return scaled


def test_output_steps_follow_the_family_not_the_field_name():
    def steps(model_type, **fields):
        config = type("Config", (), {"model_type": model_type, **fields})()
        return [(step.kind, step.value) for step in output_steps(config)]

    assert steps("granite", logits_scaling=8.0) == [("divide", 8.0)]
    assert steps("hyperclovax", logits_scaling=8.0) == [("multiply", 8.0)]  # the same field, the other way round
    assert steps("cohere", logit_scale=0.5) == [("multiply", 0.5)]
    assert steps("mpt", logit_scale=0.5) == []  # MPT's logit_scale scales attention, not its logits
    assert steps("gemma2", final_logit_softcapping=30.0) == [("softcap", 30.0)]
    assert steps("gemma2", final_logit_softcapping=None) == []
    head = torch.nn.Linear(4, 6, bias=False)
    model = type("Model", (torch.nn.Module,), {"get_output_embeddings": lambda self: head})()
    model.config = type("Config", (), {"model_type": "cohere2", "logit_scale": 0.5})()
    hidden = torch.randn(3, 4) * 10
    torch.testing.assert_close(LogitsHead(model)(hidden), head(hidden) * 0.5)
    model.config = type("Config", (), {"model_type": "gemma2", "final_logit_softcapping": 2.0})()
    torch.testing.assert_close(LogitsHead(model)(hidden), torch.tanh(head(hidden) / 2.0) * 2.0)
