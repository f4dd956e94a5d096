"""The blind baseline of a SynthVQA folder: what the question text alone scores, with no image.

    python research/question_prior.py --data SYNTH [--split val]

For every question of the training split the most common answer given to that exact question text is counted;
each question of ``--split`` is then answered with its text's most common training answer (the family's most
common one when the text never occurs in training) and scored with the harness's metrics
(:func:`mambaprune.eval.evaluate.score_samples`). Printed: the accuracy per family and, for the existence
family, per POPE sampling and true answer.

This is the level a model must beat before it can be said to read the image. On the project's SynthVQA folder
(seed 0, 2000 questions per family, val split): attr 33.4, exist 66.3, read 0.0, count 18.6, spatial 50.0.
POPE's negative sampling makes the existence question's text informative: a "popular" negative names a category
that many images hold (so it is a "no" here) and a "random" one names any absent category, often a rare one, so
answering from the text alone gets 96% of the popular negatives, 83% of the adversarial ones and 15% of the
random ones. A model at 66-70% on exist may be reading the question only.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict


def majority_answers(samples) -> tuple[dict[str, str], dict[str, str]]:
    """``(by question text, by group)``: the most common answer (the most common of each sample's answers)."""
    by_text: dict[str, Counter] = defaultdict(Counter)
    by_group: dict[str, Counter] = defaultdict(Counter)
    for s in samples:
        answer = Counter(s.answers).most_common(1)[0][0]
        by_text[s.question][answer] += 1
        by_group[s.group][answer] += 1
    pick = lambda table: {k: c.most_common(1)[0][0] for k, c in table.items()}   # noqa: E731
    return pick(by_text), pick(by_group)


def main(argv=None) -> None:
    from mambaprune.data.readers import load_dataset
    from mambaprune.eval.evaluate import score_samples

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a SynthVQA folder written by `mambaprune synth`")
    p.add_argument("--split", default="val", help="split to answer (default val; the prior comes from train)")
    a = p.parse_args(argv)
    by_text, by_group = majority_answers(load_dataset("synthvqa", a.data, "train"))
    samples = load_dataset("synthvqa", a.data, a.split)
    predictions = [by_text.get(s.question, by_group.get(s.group, "")) for s in samples]
    scores = score_samples(samples, predictions)
    print(json.dumps({g.split(":")[1]: round(100 * v["accuracy"], 1) for g, v in scores.items()}))
    pope = defaultdict(list)
    for s, pred in zip(samples, predictions):
        if s.extra.get("pope_split"):
            pope[f"{s.extra['pope_split']}, answer {s.answers[0]}"].append(pred == s.answers[0])
    print(json.dumps({k: round(100 * sum(v) / len(v), 1) for k, v in sorted(pope.items())}))


if __name__ == "__main__":
    main()
