"""LightningCLI wiring: subcommands, argument links, defaults. No training logic lives here.

python -m cgc_lightning fit --config experiments/exp.yaml
python -m cgc_lightning test --config experiments/exp.yaml --ckpt_path outputs/<exp>/<run>/checkpoints/best.ckpt
"""

from __future__ import annotations

import re
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from cgc_lightning.module import MultiTaskLoRAModule
from cgc_lightning.tracking import BestAdapterArtifact, MLflowConfigCallback
from datamodules.multitask import MultiTaskDataModule

TRAINER_DEFAULTS = {
    "logger": {"class_path": "cgc_lightning.tracking.MLflowLogger"},
    "default_root_dir": "outputs",
    "log_every_n_steps": 10,
}
_CKPT_RUN = re.compile(r"(?P<exp>[^/]+)/(?P<run>[0-9a-f]{32})/checkpoints/[^/]+\.ckpt$")


class CGCLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data module tokenises with the model's tokenizer
        parser.link_arguments("model.model", "data.tokenizer")
        # task count, names, clusters and metrics come from the data: nobody repeats them for the model
        parser.link_arguments("data.task_names", "model.task_names", apply_on="instantiate")
        parser.link_arguments("data.task_clusters", "model.task_clusters", apply_on="instantiate")
        parser.link_arguments("data.task_metrics", "model.task_metrics", apply_on="instantiate")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(BestAdapterArtifact, "best_adapter")
        parser.set_defaults(
            {
                "lr_monitor.logging_interval": "step",
                "checkpoint.monitor": "val/avg/score",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best",
            }
        )

    def before_instantiate_classes(self) -> None:
        # `test`/`validate` of a checkpoint written by `fit` logs into that fit's MLflow run
        cfg = self.config.get(self.subcommand) if self.subcommand else self.config
        ckpt = getattr(cfg, "ckpt_path", None)
        logger = cfg.trainer.logger
        if self.subcommand in ("test", "validate", "predict") and ckpt and not isinstance(logger, bool):
            m = _CKPT_RUN.search(Path(ckpt).resolve().as_posix())
            init = getattr(logger, "init_args", None)
            if m and init is not None and getattr(init, "run_id", None) is None:
                init.run_id = m.group("run")


def main(args: list[str] | None = None) -> CGCLightningCLI:
    return CGCLightningCLI(
        MultiTaskLoRAModule,
        MultiTaskDataModule,
        save_config_callback=MLflowConfigCallback,
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=42,
        args=args,
    )
