"""Models-from-code entry of a logged finetuned pipeline: MLflow runs this file to build the model (no pickle)."""

from mlflow.models import set_model

from mtn.mlflow_models.pyfunc import PipelineModel

set_model(PipelineModel())
