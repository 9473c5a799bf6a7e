"""Evaluation of :class:`~cgc_lightning.module.MultiTaskLoRAModule`: validation, test and predict steps.

Choice tasks are scored by each answer choice's log-likelihood (the prompt's KV cache reused for its choices),
generation tasks by generated text cut at its first line end; each task's metric (:class:`TaskMetric`), loss
and per-example results (:mod:`cgc_lightning.examples`) are gathered over ranks and logged per task.
"""

from __future__ import annotations

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from cgc_lightning.examples import gather as gather_examples
from cgc_lightning.examples import log_examples
from cgc_lightning.loss import IGNORE, token_losses, upcast
from cgc_lightning.routing import route
from cgc_lightning.tracking import mlflow_logger
from datamodules.collate import group_rows


class LineEndTable:
    """Per vocabulary entry, what its text does to "has the answer's first line ended?", as device tensors.

    ``ends[v]``: the token's text alone has a line break after some non-blank text; ``newline[v]``: it has a
    line break; ``text[v]``: it has non-blank text. A row has ended its first line at a token that ``ends``,
    or at a ``newline`` token once an earlier token had ``text``: exactly when its decoded continuation,
    stripped of leading blanks, holds a line break. Built once per tokenizer by decoding each entry alone.
    """

    def __init__(self, tokenizer, vocab_size: int, device: torch.device):
        size = max(vocab_size, len(tokenizer))
        texts = tokenizer.batch_decode([[v] for v in range(len(tokenizer))], skip_special_tokens=True)
        flags = torch.zeros(3, size, dtype=torch.bool)
        flags[0, : len(texts)] = torch.tensor(["\n" in t.lstrip() for t in texts])
        flags[1, : len(texts)] = torch.tensor(["\n" in t for t in texts])
        flags[2, : len(texts)] = torch.tensor([bool(t.strip()) for t in texts])
        self.ends, self.newline, self.text = flags.to(device)


class FirstLineEnded(StoppingCriteria):
    """Done for a row once its generated text has a line break after some text (leading blank lines do not
    count, as the answer is read as the first non-blank line); generation stops when every row is done.

    Reads only the newest token of each row against a :class:`LineEndTable`: no decoding and no per-row
    Python work while generating.
    """

    def __init__(self, table: LineEndTable, batch_size: int):
        self.table = table
        self.seen_text = torch.zeros(batch_size, dtype=torch.bool, device=table.text.device)  # (B,)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        token = input_ids[:, -1]  # (B,)
        done = self.table.ends[token] | (self.seen_text & self.table.newline[token])
        self.seen_text |= self.table.text[token]
        return done


def _select(batch: dict, rows: list[int]) -> dict:
    """The host-side per-example lists of ``rows`` of an evaluation batch (for the per-example records)."""
    return {k: [batch[k][i] for i in rows] for k in ("example_ids", "choices", "references")}


class EvaluationMixin:
    """The evaluation steps and hooks of the LightningModule (mixed into it)."""

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "val")

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "test")

    def _eval_step(self, batch, stage: str) -> None:
        """One evaluation batch (of one kind, :func:`datamodules.collate.eval_batches`), of any tasks: the batch is
        scored at once, then each task's rows (``batch["task_rows"]``) go to that task's metric."""
        _, task_sum, task_tokens = self._per_task_loss(batch)
        # float64: sums over many batches, in an order that depends on how the batches are made
        acc = self._eval_loss.setdefault(
            stage, torch.zeros(2, len(self.layout.tasks), device=self.device, dtype=torch.float64)
        )
        acc[0] += task_sum
        acc[1] += task_tokens
        record = stage == "test" or (stage == "val" and self.log_val_examples)
        groups = group_rows(batch)
        kind = batch.get("kind")
        if kind is None:  # a batch of one's own loader: by choices where every task of it is scored by choice
            choice = all(self.metrics[stage][t].name == "accuracy" for t in groups)
            kind = "choice" if choice and "choice_input_ids" in batch else "text"
        if kind == "choice":
            picked = self._choice_predictions(batch)
            correct = picked == batch["target_index"]
            for task, rows in groups.items():
                index = batch["task_index"][task] if len(groups) > 1 else slice(None)
                self.metrics[stage][task].update_choices(correct[index])
                if record:
                    part = _select(batch, rows) if len(groups) > 1 else batch
                    self.examples.add_choices(stage, self.layout.tasks[task], part, picked[index], correct[index])
        else:
            texts, refs = self.generate_texts(batch), batch["references"]
            for task, rows in groups.items():
                metric = self.metrics[stage][task]
                mine, their_refs = [texts[i] for i in rows], [refs[i] for i in rows]
                metric.update_texts(mine, their_refs)
                if record:
                    scores = metric.example_scores(mine, their_refs)
                    self.examples.add_texts(stage, self.layout.tasks[task], _select(batch, rows), mine, scores)

    def _choice_predictions(self, batch) -> torch.Tensor:
        """Index of the likeliest answer choice of each example, ``(B,)``."""
        example = batch["choice_example"]  # (N,) which example each (example, choice) pair belongs to
        loglik = self.choice_loglik(batch)  # (N,)
        B = batch["target_index"].shape[0]
        counts = torch.bincount(example, minlength=B)
        position = torch.arange(len(example), device=example.device) - (counts.cumsum(0) - counts)[example]
        # the log-likelihoods' dtype, not the default one (bf16 under precision="bf16-true")
        scores = torch.full((B, int(counts.max())), -torch.inf, device=loglik.device, dtype=loglik.dtype)
        scores[example, position] = loglik  # (B, max choices)
        return scores.argmax(1)

    def choice_loglik(self, batch, reuse_prompt: bool = True) -> torch.Tensor:
        """Log-likelihood of each (example, choice) pair's choice tokens given the example's prompt, ``(N,)``.

        With ``reuse_prompt`` each prompt runs once and every choice of it is scored on the prompt's KV
        cache (a prompt is often far longer than its choices); otherwise, or when the model's cache
        cannot be gathered by example, each (prompt + choice) sequence runs whole.
        """
        example, task_ids = batch["choice_example"], batch["task_ids"]
        if reuse_prompt and "choice_ids" in batch:
            prompt, pmask = batch["prompt_ids"], batch["prompt_mask"]  # (B, P), left-padded
            with route(self.model, task_ids, validate=False):
                out = self.model(
                    input_ids=prompt,
                    attention_mask=pmask,
                    position_ids=(pmask.cumsum(1) - 1).clamp_min(0),
                    use_cache=True,
                )
            cache = out.past_key_values
            if hasattr(cache, "batch_select_indices"):
                choice, cmask = batch["choice_ids"], batch["choice_ids_mask"]  # (N, C), right-padded
                # the prompt's last position predicts each choice's first token
                first = upcast(out.logits[:, -1]).log_softmax(-1)[example].gather(1, choice[:, :1]).squeeze(1)  # (N,)
                cache.batch_select_indices(example)  # (B, ...) -> (N, ...)
                positions = pmask.sum(1)[example, None] + torch.arange(choice.shape[1], device=choice.device)  # (N, C)
                with route(self.model, task_ids[example], validate=False):
                    logits = self.model(
                        input_ids=choice,
                        attention_mask=torch.cat([pmask[example], cmask], dim=1),
                        position_ids=positions,
                        past_key_values=cache,
                        use_cache=True,
                    ).logits  # (N, C, V)
                labels = choice.masked_fill(cmask == 0, IGNORE)  # (N, C)
                losses, _ = token_losses(logits, labels)  # (N, C-1): choice tokens 2.. given the ones before
                return first * cmask[:, 0] - losses.sum(1)
        losses, _ = token_losses(
            self(batch["choice_input_ids"], batch["choice_mask"], task_ids[example]), batch["choice_labels"]
        )
        return -losses.sum(1)

    @torch.no_grad()
    def generate_texts(self, batch) -> list[str]:
        """Greedy continuations of the (left-padded) prompts, up to the first line break."""
        prompt = batch["prompt_ids"]
        table = getattr(self, "_line_ends", None)
        if table is None or table.text.device != prompt.device:
            vocab = self.model.get_output_embeddings().weight.shape[0]
            self._line_ends = table = LineEndTable(self.tokenizer, vocab, prompt.device)
        with route(self.model, batch["task_ids"], validate=False):
            out = self.model.generate(
                input_ids=prompt,
                attention_mask=batch["prompt_mask"],
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                # the answer is the first line: stop once every row has ended one (or reached EOS)
                stopping_criteria=StoppingCriteriaList([FirstLineEnded(table, prompt.shape[0])]),
            )
        texts = self.tokenizer.batch_decode(out[:, prompt.shape[1] :], skip_special_tokens=True)
        return [t.strip().split("\n")[0].strip() for t in texts]

    def _log_eval(self, stage: str) -> None:
        acc = self._eval_loss.pop(stage, None)
        if self._world_size > 1:  # each rank evaluated its share of every task (the metrics sync themselves)
            if acc is None:
                acc = torch.zeros(2, len(self.layout.tasks), device=self.device, dtype=torch.float64)
            acc = self.trainer.strategy.reduce(acc, reduce_op="sum")
        scores, losses = [], []
        self.results[stage] = rows = []  # (task, metric, value, loss) for the CLI's results table
        for t, name in enumerate(self.layout.tasks):
            metric = self.metrics[stage][t]
            # text metrics (ROUGE, BLEU, SQuAD) compute on the host whatever device they sit on, choice
            # accuracy on the module's device: bring every value to one device before averaging
            value = metric.compute().to(self.device, torch.float32)
            metric.reset()
            self.log(f"{stage}/{name}/{metric.name}", value, add_dataloader_idx=False)
            scores.append(value)
            loss = None
            if acc is not None and acc[1, t] > 0:
                loss = acc[0, t] / acc[1, t]
                self.log(f"{stage}/{name}/loss", loss, add_dataloader_idx=False)
                losses.append(loss)
            rows.append((name, metric.name, value, loss))
        self.log(f"{stage}/avg/score", torch.stack(scores).mean(), prog_bar=True, add_dataloader_idx=False)
        if losses:
            self.log(f"{stage}/avg/loss", torch.stack(losses).mean(), add_dataloader_idx=False)
        if stage == "test" or (stage == "val" and self.log_val_examples):
            rows = gather_examples(self.examples.pop(stage), self._world_size)
            if self._trainer is not None and self._trainer.is_global_zero and not self._trainer.sanity_checking:
                name = "test" if stage == "test" else f"val_step{self._trainer.global_step}"
                log_examples(mlflow_logger(self._trainer), rows, f"examples/{name}.json")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch, batch_idx, dataloader_idx: int = 0) -> list[dict]:
        texts = self.generate_texts(batch)
        task = self.layout.tasks[dataloader_idx]
        return [
            {"task": task, "prediction": p, "references": r} for p, r in zip(texts, batch["references"], strict=True)
        ]
