"""Translators and finetuned pipelines as MLflow models: logged with `mlflow.pyfunc` (a run's "Logged models"),
registered from the logged model, promoted with aliases.

    info = log_translator(run_id, "outputs/local/translator", tracking_uri=uri)   # the run's logged model
    register(client, "mtn-translator", info, alias="champion")                     # -> "models:/mtn-translator/3"
    mlflow.pyfunc.load_model("models:/mtn-translator@champion").predict(["ein Hund"])   # [1, S_t, d_t] float32

A logged model holds the folder as an artifact (`<model>/artifacts/translator/`, `.../pipeline/`), so
`mtn.uris.fetch_folder("models:/name@alias", "translator.json")` and the service find it there. The wrappers are
loaded from code (`translator_code.py`, `pipeline_code.py`), never unpickled.
"""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mtn.mlflow_models.pyfunc import PIPELINE, PIPELINE_PARAMS, TRANSLATOR, TranslatorModel

HERE = Path(__file__).parent
EXAMPLE = ["ein Hund rennt am Strand", "a red dog"]
CHAMPION = "champion"
SOURCE_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.user")  # copied from the run


def _requirements() -> list[str]:
    """Pinned to what logged the model; given explicitly so MLflow does not load the model in a subprocess to
    infer them."""
    out = []
    for pkg in ("mtn", "torch", "transformers", "diffusers", "safetensors", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


def translator_signature(folder: str | Path):
    """prompts (one string column) -> a float32 tensor [-1, S_t, d_t], read from the folder's model config."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    from mtn.translator import MTN_SUBFOLDER

    config = json.loads((Path(folder) / MTN_SUBFOLDER / "config.json").read_text())
    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([TensorSpec(np.dtype("float32"),
                                                     (-1, config["target_len"], config["target_dim"]))]))


def pipeline_signature():
    """prompts -> uint8 images [-1, H, W, 3]; params as in PIPELINE_PARAMS."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec(k, "long" if isinstance(v, int) else "double", v)
                          for k, v in PIPELINE_PARAMS.items()])
    return ModelSignature(inputs=Schema([ColSpec("string")]),
                          outputs=Schema([TensorSpec(np.dtype("uint8"), (-1, -1, -1, 3))]), params=params)


def log_translator(run_id: str, folder: str | Path, name: str = TRANSLATOR, tracking_uri: str | None = None):
    """Log a local translator folder as a pyfunc model of run `run_id` -> mlflow's ModelInfo (`.model_id`,
    `.model_uri`). MLflow checks the input example by loading the model and encoding it once."""
    return _log(run_id, name, "translator_code.py", {TRANSLATOR: str(folder)}, translator_signature(folder),
                EXAMPLE, tracking_uri)


def log_pipeline(run_id: str, pipeline: str | Path, translator: str | Path | None = None, name: str = PIPELINE,
                 tracking_uri: str | None = None):
    """Log a finetuned diffusers pipeline folder and the translator that drives it (None: the pipeline's own text
    encoder) as one pyfunc model. The input example asks for one denoising step, so MLflow's check at log time
    stays cheap."""
    artifacts = {PIPELINE: str(pipeline), **({TRANSLATOR: str(translator)} if translator else {})}
    return _log(run_id, name, "pipeline_code.py", artifacts, pipeline_signature(), (EXAMPLE[:1],
                {"num_inference_steps": 1}), tracking_uri)


def _log(run_id, name, code, artifacts, signature, example, tracking_uri):
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    # no active run or experiment needed (global state): the logged model is created in the run's experiment
    # (MLflow would otherwise pick the process's active experiment, "Default"), then Model.log fills it
    uri = tracking_uri or mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    model = client.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id,
                                       params={k: str(v) for k, v in run.data.params.items()},
                                       tags={k: v for k, v in run.data.tags.items() if k in SOURCE_TAGS})
    with _use_tracking_uri(uri):  # Model.log reads the process-wide URI: this one, for the call
        return Model.log(None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=model.model_id,
                         python_model=str(HERE / code), artifacts=artifacts, signature=signature,
                         input_example=example, pip_requirements=_requirements())


def register(client, name: str, model_info, alias: str | None = None, tags: dict[str, str] | None = None) -> str:
    """A new version of registered model `name` from a logged model (ModelInfo or LoggedModel), with version `tags`;
    `alias` (e.g. "champion") moved to it. -> "models:/<name>/<version>", which serve/ and mtn.uris.fetch_folder
    accept."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    model_id = model_info.model_id
    run_id = getattr(model_info, "run_id", None) or getattr(model_info, "source_run_id", None)
    # a local (sqlite) registry looks the logged model up through the process-wide tracking URI (MLflow 3.17):
    # make that the client's for this call
    with _use_tracking_uri(client.tracking_uri):
        mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id, model_id=model_id,
                                         tags=tags or None)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return f"models:/{name}/{mv.version}"


__all__ = ["CHAMPION", "EXAMPLE", "TranslatorModel", "log_pipeline", "log_translator", "pipeline_signature",
           "register", "translator_signature"]
