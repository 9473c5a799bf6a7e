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


class FirstLineEnded(StoppingCriteria):
    """Done for a row once its generated text has a line break after some text (leading blank lines do not
    count, as the answer is read as the first non-blank line); generation stops when every row is done."""

    def __init__(self, tokenizer, prompt_length: int):
        self.tokenizer, self.prompt_length = tokenizer, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)


class EvaluationMixin:
    """The evaluation steps and hooks of the LightningModule (mixed into it)."""

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "val", dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self._eval_step(batch, "test", dataloader_idx)

    def _eval_step(self, batch, stage: str, task: int) -> None:
        _, task_sum, task_tokens = self._per_task_loss(batch)
        acc = self._eval_loss.setdefault(stage, torch.zeros(2, len(self.layout.tasks), device=self.device))
        acc[0] += task_sum
        acc[1] += task_tokens
        metric = self.metrics[stage][task]
        record = stage == "test" or (stage == "val" and self.log_val_examples)
        name = self.layout.tasks[task]
        if metric.name == "accuracy" and "choice_input_ids" in batch:
            picked = self._choice_predictions(batch)
            correct = picked == batch["target_index"]
            metric.update_choices(correct)
            if record and "example_ids" in batch:
                self.examples.add_choices(stage, name, batch, picked, correct)
        else:
            texts = self.generate_texts(batch)
            metric.update_texts(texts, batch["references"])
            if record and "example_ids" in batch:
                self.examples.add_texts(stage, name, batch, texts, metric.example_scores(texts, batch["references"]))

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
        with route(self.model, batch["task_ids"], validate=False):
            out = self.model.generate(
                input_ids=prompt,
                attention_mask=batch["prompt_mask"],
                do_sample=False,
                max_new_tokens=self.max_new_tokens,
                pad_token_id=self.tokenizer.pad_token_id,
                # the answer is the first line: stop once every row has ended one (or reached EOS)
                stopping_criteria=StoppingCriteriaList([FirstLineEnded(self.tokenizer, prompt.shape[1])]),
            )
        texts = self.tokenizer.batch_decode(out[:, prompt.shape[1] :], skip_special_tokens=True)
        return [t.strip().split("\n")[0].strip() for t in texts]

    def _log_eval(self, stage: str) -> None:
        acc = self._eval_loss.pop(stage, None)
        if self._world_size > 1:  # each rank evaluated its share of every task (the metrics sync themselves)
            if acc is None:
                acc = torch.zeros(2, len(self.layout.tasks), device=self.device)
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
