"""Sequence-level KD data from a teacher, and on-policy (GKD) rollouts of the student."""

import pytest
import torch
from conftest import (
    VOCAB,
    classification_data,
    config,
    grouped_query_lm_config,
    lm_data,
    seq2seq_data,
    tiny_bert,
    tiny_gpt2,
    tiny_t5,
)
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from hf_kd import DistillationTrainer
from hf_kd.cache import write_teacher_cache
from hf_kd.data import add_sample_index
from hf_kd.generation import (
    ON_POLICY_KEY,
    _after_first_eos,
    _left_padded_prompts,
    generate_teacher_outputs,
    student_rollout,
    tokenize_prompt_completion,
)


def _tiny_grouped_query_lm(config_class, model_class, seed):
    torch.manual_seed(seed)
    return model_class(grouped_query_lm_config(config_class))


def tiny_llama(seed=0):
    return _tiny_grouped_query_lm(LlamaConfig, LlamaForCausalLM, seed)


def tiny_qwen2(seed=0):
    return _tiny_grouped_query_lm(Qwen2Config, Qwen2ForCausalLM, seed)


def word_tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[EOS]", "[UNK]", *[f"w{i}" for i in range(VOCAB - 3)]]
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", eos_token="[EOS]", unk_token="[UNK]")


def test_prompts_are_the_tokens_before_the_first_label():
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, 0], [9, 10, 11, 12, 13]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        "labels": torch.tensor([[-100, -100, 7, 8, -100], [-100, 10, 11, 12, 13]]),
    }
    prompts, mask = _left_padded_prompts(batch, pad=0)
    assert prompts.tolist() == [[5, 6], [0, 9]] and mask.tolist() == [[1, 1], [0, 1]]


def test_tokens_after_the_first_eos_are_padding():
    tokens = torch.tensor([[4, 2, 5, 2], [4, 5, 6, 7]])
    assert _after_first_eos(tokens, {2}).tolist() == [[False, False, True, True], [False] * 4]


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama, tiny_qwen2])
def test_greedy_rollout_rows_are_what_the_student_would_predict(make_model):
    model = make_model()
    data = lm_data(n=4, length=10)
    batch = {key: torch.tensor(data[key]) for key in data.column_names}
    rollout = student_rollout(model, batch, {"max_new_tokens": 5, "do_sample": False})
    assert rollout[ON_POLICY_KEY] and model.training
    prompts, prompt_mask = _left_padded_prompts(batch, pad=0)
    ids, labels, mask = rollout["input_ids"], rollout["labels"], rollout["attention_mask"]
    with torch.no_grad():
        predicted = model(input_ids=ids, attention_mask=mask).logits.argmax(-1)
    for row in range(4):
        length = int(prompt_mask[row].sum())
        assert ids[row, :length].tolist() == prompts[row, -length:].tolist()  # right-padded: prompt first
        assert (labels[row, :length] == -100).all()
        sampled = labels[row].ne(-100)
        assert int(sampled.sum()) == 5 and int(mask[row].sum()) == length + 5
        # In the rebuilt batch, each sampled token is the argmax of the position before it: same positions as
        # during generation.
        positions = sampled.nonzero().flatten()
        assert predicted[row, positions - 1].tolist() == ids[row, positions].tolist()


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama, tiny_qwen2])
def test_on_policy_training_scores_student_samples_without_label_loss(tmp_path, make_model):
    data = lm_data(n=16)
    args = config(tmp_path, losses="jsd:1.0:beta=0.5", on_policy_fraction=1.0, generation_max_new_tokens=4, max_steps=2)
    trainer = DistillationTrainer(
        model=make_model(seed=2), teacher_model=make_model(seed=1), args=args, train_dataset=data
    )
    seen = []
    compute_loss = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):  # the batches the loss is computed on
        seen.append({key: value.clone() if torch.is_tensor(value) else value for key, value in inputs.items()})
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "jsd" in entry]
    assert len(logged) == 2 and all("ce" not in entry for entry in logged)  # own samples are no target
    assert len(seen) == 2 and all(batch.get(ON_POLICY_KEY) for batch in seen)
    originals = [
        (ids[: sum(mask)], labels.index(next(x for x in labels if x != -100)))
        for ids, mask, labels in zip(data["input_ids"], data["attention_mask"], data["labels"])
    ]
    for batch in seen:
        for ids, mask in zip(batch["input_ids"].tolist(), batch["attention_mask"].tolist()):
            row = ids[: sum(mask)]
            assert all(row != original for original, _ in originals)  # not a data row: the student's sample
            assert any(row[:prompt] == original[:prompt] for original, prompt in originals)  # after a data prompt


def test_on_policy_fraction_picks_steps_reproducibly(tmp_path):
    data = lm_data(n=16)
    chosen = []
    for _ in range(2):
        args = config(
            tmp_path, on_policy_fraction=0.5, generation_max_new_tokens=2, max_steps=8, per_device_train_batch_size=4
        )
        trainer = DistillationTrainer(
            model=tiny_gpt2(seed=2), teacher_model=tiny_gpt2(seed=1), args=args, train_dataset=data
        )
        trainer.train()
        chosen.append(["ce" not in entry for entry in trainer.state.log_history if "kl" in entry])
    assert chosen[0] == chosen[1] and 0 < sum(chosen[0]) < 8


def test_on_policy_seq2seq(tmp_path):
    args = config(tmp_path, on_policy_fraction=1.0, generation_max_new_tokens=3, max_steps=2, losses="jsd")
    trainer = DistillationTrainer(
        model=tiny_t5(seed=2), teacher_model=tiny_t5(32, 2, seed=1), args=args, train_dataset=seq2seq_data()
    )
    trainer.train()
    assert all("ce" not in entry for entry in trainer.state.log_history if "jsd" in entry)


def test_on_policy_needs_a_generating_student_and_a_live_teacher(tmp_path):
    with pytest.raises(ValueError, match="causal and seq2seq LMs"):
        DistillationTrainer(
            model=tiny_bert(),
            teacher_model=tiny_bert(),
            args=config(tmp_path, on_policy_fraction=0.5),
            train_dataset=classification_data(),
        )
    data = add_sample_index(lm_data(n=4))
    cache = write_teacher_cache(tiny_gpt2(seed=1), data, str(tmp_path / "cache"), top_k=4, progress=False)
    with pytest.raises(ValueError, match="teacher cache has no outputs"):
        DistillationTrainer(
            model=tiny_gpt2(), teacher_model=cache, args=config(tmp_path, on_policy_fraction=0.5), train_dataset=data
        )
    with pytest.raises(ValueError, match=r"on_policy_fraction must lie in \[0, 1\]"):
        config(tmp_path, on_policy_fraction=1.5)
    with pytest.raises(ValueError, match="needs labels that mark each row's completion"):
        student_rollout(tiny_gpt2(), {"input_ids": torch.ones(1, 3, dtype=torch.long)}, {"max_new_tokens": 1})


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama, tiny_qwen2])
def test_sequence_level_kd_trains_on_teacher_generations(tmp_path, make_model):
    tokenizer = word_tokenizer()
    teacher = make_model(seed=1)
    prompts = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10"] * 2})
    generated = generate_teacher_outputs(teacher, tokenizer, prompts, max_new_tokens=4, batch_size=3, progress=False)
    assert generated.column_names == ["prompt", "completion"]
    # Greedy and batched (left-padded) gives what the teacher generates for the prompt alone.
    alone = teacher.generate(
        **tokenizer(["w6 w7 w8 w9"], return_tensors="pt"),
        max_new_tokens=4,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert generated[2]["completion"] == tokenizer.decode(alone[0, 4:], skip_special_tokens=True)
    rows = tokenize_prompt_completion(generated, tokenizer, max_length=16)
    first = rows[0]
    assert first["labels"][:3] == [-100] * 3 and first["labels"][3:] == first["input_ids"][3:]
    assert first["input_ids"][-1] == tokenizer.eos_token_id
    args = config(tmp_path, max_steps=2, per_device_train_batch_size=4, losses="kl")  # seq-KD + word-level KD
    from transformers import DataCollatorForSeq2Seq

    trainer = DistillationTrainer(
        model=make_model(seed=2),
        teacher_model=teacher,
        args=args,
        train_dataset=rows,
        data_collator=DataCollatorForSeq2Seq(tokenizer),
    )
    trainer.train()
    assert any("ce" in entry and "kl" in entry for entry in trainer.state.log_history)


def test_seq2seq_teacher_generation(tmp_path):
    tokenizer = word_tokenizer()
    prompts = Dataset.from_dict({"prompt": ["w1 w2 w3", "w4 w5"]})
    generated = generate_teacher_outputs(
        tiny_t5(seed=1), tokenizer, prompts, max_new_tokens=3, num_beams=2, progress=False
    )
    assert len(generated["completion"]) == 2 and all(isinstance(text, str) for text in generated["completion"])


def test_sampled_teacher_generation_is_seeded_and_leaves_the_callers_rng_alone():
    tokenizer = word_tokenizer()
    prompts = Dataset.from_dict({"prompt": ["w1 w2", "w3", "w4 w5 w6"]})
    teacher = tiny_gpt2(seed=1)

    def sample(seed):
        return generate_teacher_outputs(
            teacher, tokenizer, prompts, max_new_tokens=6, do_sample=True, seed=seed, progress=False
        )["completion"]

    assert sample(7) == sample(7) and sample(7) != sample(8)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(7)
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is where it was


def test_left_padding_for_generation_does_not_leak_into_a_saved_tokenizer(tmp_path):
    # Padding on the left enables padding in the fast tokenizer's backend, which save_pretrained writes into
    # tokenizer.json: the student's saved tokenizer then reloaded left-padding (and padded seq2seq labels left).
    from transformers import AutoTokenizer

    from hf_kd.data import train_bpe_tokenizer
    from hf_kd.generation import _left_padding

    tokenizer = train_bpe_tokenizer(["a b c d", "e f g", "a c e g"], 300, eos_token="</s>", pad_token="<pad>")
    with _left_padding(tokenizer):
        assert tokenizer(["a b", "a b c d"], padding=True)["attention_mask"][0][0] == 0  # padded on the left
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer.padding_side == reloaded.padding_side == "right"
    assert reloaded(["a b", "a b c d"], padding=True)["attention_mask"][0][-1] == 0
