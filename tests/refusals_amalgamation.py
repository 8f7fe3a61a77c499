"""Refusals of knowledge amalgamation (hf_kd.schemes.amalgamation): each before anything trains."""

from conftest import classification_data, config, tiny_bert
from refusal_cases import Case

from hf_kd.schemes import AmalgamationConfig, run_scheme


def _named(names, hidden=32, seed=1):
    model = tiny_bert(hidden=hidden, num_labels=len(names), seed=seed)
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: index for index, name in enumerate(names)}
    return model


def _amalgamate(teachers, student_names, **overrides):
    return lambda p: run_scheme(
        "amalgamation",
        config(p / "out", max_steps=1, **overrides),
        teacher=teachers(),
        make_student=lambda k: _named(student_names, hidden=16, seed=10 + k),
        train_dataset=classification_data(n=8),
    )


def _low_high():
    return {"low": _named(["a", "b"]), "high": _named(["b", "c", "d"], seed=2)}


CASES = [
    Case(
        "amalgamation-class-not-in-student",
        '`run_scheme("amalgamation", ...)`, a teacher knows class `d`, the student\'s id2label is a, b, c',
        _amalgamate(_low_high, ["a", "b", "c"]),
        ValueError,
        "teacher 'high' knows the classes ['d'], which the student does not have",
    ),
    Case(
        "amalgamation-class-no-teacher-knows",
        '`run_scheme("amalgamation", ...)`, the student has a class `e` that no teacher knows',
        _amalgamate(_low_high, ["a", "b", "c", "d", "e"]),
        ValueError,
        "the student's classes ['e'] are known by no teacher",
    ),
    Case(
        "amalgamation-placeholder-names",
        '`run_scheme("amalgamation", ...)`, teachers whose id2label are transformers\' LABEL_0, LABEL_1, ...',
        _amalgamate(lambda: [tiny_bert(seed=1)], ["a", "b", "c"]),
        ValueError,
        "are transformers' placeholder names, which name no class",
    ),
    Case(
        "amalgamation-class-named-twice",
        '`run_scheme("amalgamation", ...)`, the student\'s id2label names `a` twice',
        _amalgamate(lambda: [_named(["a", "b", "c"])], ["a", "b", "a"]),
        ValueError,
        "the student's config.id2label names ['a'] more than once",
    ),
    Case(
        "amalgamation-other-logit-loss",
        '`run_scheme("amalgamation", ...)` with `losses="kl,logit_mse"`',
        _amalgamate(_low_high, ["a", "b", "c", "d"], losses="kl,logit_mse"),
        ValueError,
        "losses also lists 'logit_mse', which would compare the student's logits class by class",
    ),
    Case(
        "amalgamation-aggregation",
        '`run_scheme("amalgamation", ...)` with `teacher_aggregation="adaptive"`',
        _amalgamate(_low_high, ["a", "b", "c", "d"], teacher_aggregation="adaptive"),
        ValueError,
        "gives each teacher its own term on its own classes and combines no distributions",
    ),
    Case(
        "amalgamation-unknown-loss",
        '`AmalgamationConfig(loss="jsd")`',
        lambda p: AmalgamationConfig(loss="jsd"),
        ValueError,
        "amalgamation's loss is one of ['uhc', 'kl']",
    ),
]
