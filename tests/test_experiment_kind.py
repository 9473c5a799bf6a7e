"""Experiments are tagged as model training, so MLflow 3's UI opens them on their runs, not the GenAI overview."""

from __future__ import annotations

from cgc_lightning.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MLflowLogger


def test_a_new_experiment_is_tagged_and_an_existing_kind_is_kept(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    logger = MLflowLogger(experiment_name="fresh", tracking_uri=uri)
    client, exp_id = logger.experiment, logger.experiment_id
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"

    other = client.create_experiment("chosen")
    client.set_experiment_tag(other, EXPERIMENT_KIND_TAG, "genai_development")
    MLflowLogger(experiment_name="chosen", tracking_uri=uri).experiment  # noqa: B018 (creates the run)
    assert client.get_experiment(other).tags[EXPERIMENT_KIND_TAG] == "genai_development", "the user's choice stays"
