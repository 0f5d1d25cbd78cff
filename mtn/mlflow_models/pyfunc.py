"""The pyfunc wrappers: what `mlflow.pyfunc.load_model(...).predict(...)` runs for a translator or a pipeline.

They hold no state but what `load_context` builds from the model's artifacts (the translator / pipeline folders,
copied into the logged model), so nothing is pickled: MLflow loads them from code (see `translator_code.py`).
"""

from __future__ import annotations

import numpy as np
from mlflow.pyfunc import PythonModel

TRANSLATOR = "translator"  # the artifact names inside a logged model: <model>/artifacts/<name>/
PIPELINE = "pipeline"


def prompts_of(model_input) -> list[str]:
    """What MLflow passes after checking the input against a one-string-column schema (a DataFrame), or what a
    caller passes to an unwrapped model (a list, a 1-d array, a Series) -> a list of prompts."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] != 1:
            from mtn.errors import MTNError

            raise MTNError(f"expected one column of prompts, got {model_input.shape[1]} columns")
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        return [model_input]
    return [str(p) for p in list(model_input)]


class _Wrapper(PythonModel):
    # the signature is given when logging (a tensor output); MLflow's type-hint validation would replace it by
    # "Any" (with hints) or warn on every import (without): opt out, as MLflow's own ChatModel subclasses do
    _skip_type_hint_validation = True


class TranslatorModel(_Wrapper):
    """prompts -> the translator's embeddings, [B, S_t, d_t] float32 (what a diffusers pipeline takes as
    `prompt_embeds`)."""

    def load_context(self, context):
        from mtn.translator import load_translator

        self.translator = load_translator(context.artifacts[TRANSLATOR])

    def predict(self, context, model_input, params=None):
        return self.translator.encode(prompts_of(model_input)).float().cpu().numpy()  # [B, S_t, d_t]


class PipelineModel(_Wrapper):
    """prompts -> images, [B, H, W, 3] uint8: the finetuned pipeline driven by its translator's embeddings (by its
    own text encoder when logged without one). Params: num_inference_steps, guidance_scale, seed (image i uses
    seed + i), width and height (0: the pipeline's default)."""

    def load_context(self, context):
        from mtn.pipeline import load_pipeline
        from mtn.translator import load_translator

        self.pipe = load_pipeline(context.artifacts[PIPELINE])
        folder = context.artifacts.get(TRANSLATOR)
        self.translator = load_translator(folder) if folder else None

    def predict(self, context, model_input, params=None):
        from mtn.pipeline import generate

        params = {**PIPELINE_PARAMS, **(params or {})}
        prompts = prompts_of(model_input)
        native = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor  # what diffusers defaults to
        images = generate(self.pipe, self.translator, prompts,
                          seeds=[int(params["seed"]) + i for i in range(len(prompts))],
                          num_inference_steps=int(params["num_inference_steps"]),
                          guidance_scale=float(params["guidance_scale"]),
                          width=int(params["width"]) or native, height=int(params["height"]) or native)
        return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # [B, H, W, 3]


PIPELINE_PARAMS = {"num_inference_steps": 30, "guidance_scale": 7.5, "seed": 0, "width": 0, "height": 0}
