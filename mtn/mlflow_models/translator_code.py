"""Models-from-code entry of a logged translator: MLflow runs this file to build the model (nothing is pickled)."""

from mlflow.models import set_model

from mtn.mlflow_models.pyfunc import TranslatorModel

set_model(TranslatorModel())
