"""Per-task evaluation metrics on torchmetrics, all reported in [0, 1], higher is better.

* ``accuracy``: with answer choices, the choice whose tokens have the highest summed
  log-likelihood given the prompt (BIG-bench's multiple-choice scoring); without, exact match of
  the generated text.
* ``exact_match`` and ``f1``: SQuAD-normalised exact match and token F1 of the generated text
  against any reference (``torchmetrics.text.SQuAD``).
* ``rouge_l``: ROUGE-L F-measure; ``bleu``: smoothed BLEU-4.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MeanMetric
from torchmetrics.functional.text import bleu_score, rouge_score, squad
from torchmetrics.text import BLEUScore, ROUGEScore, SQuAD

#: Metrics where a lower value is better (none of ours; the comparison report reads this).
LOWER_IS_BETTER: frozenset[str] = frozenset({"loss"})


class TaskMetric(nn.Module):
    """One task's metric: fed choice correctness or generated texts, computes one number in [0, 1]."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self.mean = MeanMetric()  # accuracy from choices, or exact match of generations
        if name in ("exact_match", "f1"):
            self.text = SQuAD()
        elif name == "rouge_l":
            self.text = ROUGEScore(rouge_keys="rougeL")
        elif name == "bleu":
            self.text = BLEUScore(n_gram=4, smooth=True)
        else:
            self.text = None

    @property
    def needs_generation(self) -> bool:
        return self.name != "accuracy"

    def update_choices(self, correct: torch.Tensor) -> None:
        """correct: (B,) bool, the likeliest choice was the target."""
        self.mean.update(correct.float())

    def update_texts(self, predictions: list[str], references: list[list[str]]) -> None:
        if self.name == "accuracy":
            hits = [
                float(any(_normalise(p) == _normalise(r) for r in refs))
                for p, refs in zip(predictions, references, strict=True)
            ]
            self.mean.update(torch.tensor(hits, device=self.mean.device))
        elif isinstance(self.text, SQuAD):
            preds = [{"prediction_text": p, "id": str(i)} for i, p in enumerate(predictions)]
            target = [
                {"answers": {"answer_start": [0] * len(r), "text": r}, "id": str(i)} for i, r in enumerate(references)
            ]
            self.text.update(preds, target)
        else:
            self.text.update(predictions, references)

    def compute(self) -> torch.Tensor:
        if self.text is None:
            return self.mean.compute()
        value = self.text.compute()
        if isinstance(self.text, SQuAD):
            return value[self.name] / 100.0
        if isinstance(self.text, ROUGEScore):
            return value["rougeL_fmeasure"]
        return value

    def example_scores(self, predictions: list[str], references: list[list[str]]) -> list[float]:
        """Each generated example's own score in [0, 1], for per-example results and paired statistics.

        The mean of these is the task's metric for accuracy, exact_match, f1 and rouge_l (each is a mean over
        examples); for bleu it is the mean sentence BLEU, not the corpus BLEU that :meth:`compute` reports.
        """
        if self.name == "accuracy":
            return [
                float(any(_normalise(p) == _normalise(r) for r in refs))
                for p, refs in zip(predictions, references, strict=True)
            ]
        if isinstance(self.text, SQuAD):
            scores = []
            for p, refs in zip(predictions, references, strict=True):
                one = squad(
                    [{"prediction_text": p, "id": "0"}],
                    [{"answers": {"answer_start": [0] * len(refs), "text": refs}, "id": "0"}],
                )
                scores.append(float(one[self.name]) / 100.0)
            return scores
        if isinstance(self.text, ROUGEScore):
            return [
                float(rouge_score(p, refs, rouge_keys="rougeL")["rougeL_fmeasure"])
                for p, refs in zip(predictions, references, strict=True)
            ]
        return [
            float(bleu_score([p], [refs], n_gram=4, smooth=True))
            for p, refs in zip(predictions, references, strict=True)
        ]

    def reset(self) -> None:
        self.mean.reset()
        if self.text is not None:
            self.text.reset()


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())
