"""Translators and finetuned pipelines as MLflow models: logged as pyfunc (models from code, no pickle) under the
run's "Logged models", registered, promoted with an alias, loaded with mlflow.pyfunc and by mtn.uris."""

import numpy as np
import pandas as pd

from mtn.mlflow_models import CHAMPION, log_pipeline, log_translator, register

PROMPTS = ["ein Hund", "a red dog on the beach"]


def test_translator_model_logged_registered_promoted_and_loaded(mlflow_registry, tiny_serving, tmp_path):
    import mlflow

    from mtn.translator import load_translator
    from mtn.uris import fetch_folder

    client, exp = mlflow_registry
    run_id = client.create_run(exp, tags={"mlflow.source.name": "jobs/train_mtn.py"}).info.run_id
    info = log_translator(run_id, tiny_serving[1], tracking_uri=client.tracking_uri)
    # the run lists it under "Logged models"; it carries the run's source tag
    (logged,) = mlflow.search_logged_models(experiment_ids=[exp], output_format="list")
    assert (logged.model_id, logged.name, logged.source_run_id) == (info.model_id, "translator", run_id)
    assert logged.tags["mlflow.source.name"] == "jobs/train_mtn.py"
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [info.model_id]
    signature = info.signature.to_dict()
    assert '"tensor-spec": {"dtype": "float32", "shape": [-1, 77, 48]}' in signature["outputs"]
    assert signature["inputs"] == '[{"type": "string", "required": true}]'

    assert register(client, "x", info, alias=CHAMPION) == "models:/x/1"
    assert int(client.get_model_version_by_alias("x", CHAMPION).version) == 1
    want = load_translator(tiny_serving[1]).encode(PROMPTS).numpy()  # [2, 77, 48]
    model = mlflow.pyfunc.load_model(f"models:/x@{CHAMPION}")
    got = model.predict(PROMPTS)
    assert got.dtype == np.float32 and got.shape == (2, 77, 48)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model.predict(pd.DataFrame({"prompt": PROMPTS[::-1]})), want[::-1], rtol=1e-5,
                               atol=1e-6)

    # mtn.uris (the service's download cache) finds the translator folder inside the model's artifacts, by
    # alias and by the run's model name
    folder = fetch_folder(f"models:/x@{CHAMPION}", "translator.json", cache_dir=tmp_path / "cache")
    assert folder.parent.name == "artifacts"
    np.testing.assert_allclose(load_translator(folder).encode(PROMPTS).numpy(), want, rtol=1e-5, atol=1e-6)
    assert (fetch_folder(f"runs:/{run_id}/translator", "translator.json", cache_dir=tmp_path / "cache")
            / "translator.json").read_text() == (folder / "translator.json").read_text()

    # the service serves a route given as models:/x@champion: its core loads the promoted translator and generates
    from serve.config import AppArgs
    from serve.generator import GeneratorCore

    core = GeneratorCore(AppArgs.model_validate({"pipeline": str(tiny_serving[0]), "device": "cpu",
                                                 "translators": {"de": f"models:/x@{CHAMPION}"}}),
                         cache_dir=str(tmp_path / "serve-cache"))
    served = core.load_translator("de")
    np.testing.assert_allclose(served.encode(PROMPTS).numpy(), want, rtol=1e-5, atol=1e-6)
    (out,) = core.run([(served, {"prompt": PROMPTS[0], "negative_prompt": "", "num_inference_steps": 1,
                                 "guidance_scale": 5.0, "width": 32, "height": 32, "seed": 0, "num_images": 1})])
    assert len(out["images"]) == 1


def test_finetuned_pipeline_model_gives_the_images_of_generate(mlflow_registry, tiny_serving, tmp_path):
    import mlflow

    from mtn.pipeline import generate, load_pipeline
    from mtn.translator import load_translator
    from mtn.uris import fetch_folder

    client, exp = mlflow_registry
    run_id = client.create_run(exp).info.run_id
    info = log_pipeline(run_id, tiny_serving[0], tiny_serving[1], tracking_uri=client.tracking_uri)
    assert register(client, "ft", info) == "models:/ft/1" and not client.get_registered_model("ft").aliases
    model = mlflow.pyfunc.load_model("models:/ft/1")
    images = model.predict(PROMPTS[:1], params={"num_inference_steps": 2, "seed": 5, "width": 32, "height": 32})
    assert images.dtype == np.uint8 and images.shape == (1, 32, 32, 3)
    (want,) = generate(load_pipeline(str(tiny_serving[0])), load_translator(tiny_serving[1]), PROMPTS[:1], seeds=[5],
                       num_inference_steps=2, guidance_scale=7.5, width=32, height=32)
    np.testing.assert_array_equal(images[0], np.asarray(want.convert("RGB")))
    assert model.predict(PROMPTS, params={"num_inference_steps": 1}).shape == (2, 16, 16, 3)  # diffusers' default
    assert fetch_folder("models:/ft/1", "model_index.json", cache_dir=tmp_path / "cache").parent.name == "artifacts"
