"""Helpers for tests that use an MLflow store (sqlite in tmp_path)."""


def register_plain_folder(client, name: str, run_id: str, artifact_path: str) -> str:
    """Register a run's artifact folder as a version of `name`, as mtn did before translators were logged as MLflow
    models: such versions (no MLmodel, the folder itself) must stay loadable. -> "models:/<name>/<version>"."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    return f"models:/{name}/{client.create_model_version(name, source=source, run_id=run_id).version}"
