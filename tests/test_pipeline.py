import numpy as np
import pytest
import torch

from mtn.errors import MTNError
from mtn.pipeline import (
    check_takes_embeddings,
    generate,
    load_pipeline,
    run_pipeline,
    set_scheduler,
    text_embeddings,
)
from mtn.tiny.sd import build_tiny_sd_pipeline
from mtn.translator import load_translator

KW = dict(num_inference_steps=2, width=32, height=32, guidance_scale=5.0)


@pytest.fixture(scope="module")
def pipe(tiny_serving):
    return load_pipeline(str(tiny_serving[0]))


@pytest.fixture(scope="module")
def translator(tiny_serving):
    return load_translator(tiny_serving[1])


def px(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def test_tiny_pipeline_text_encoder_is_tiny_clip():
    from mtn.encoders import load_text_encoder

    p = build_tiny_sd_pipeline()
    clip = load_text_encoder("tiny:clip", max_length=77)
    ids = p.tokenizer(["a red dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ids, clip.tokenize(["a red dog"])["input_ids"])
    with torch.no_grad():
        assert torch.allclose(p.text_encoder(ids)[0], clip(["a red dog"])[0], atol=1e-6)


def test_translator_embeddings_both_halves_from_the_translator(pipe, translator):
    pos, neg = text_embeddings(pipe, translator, ["ein Hund", "un chat"], ["", "blurry"])
    assert pos.shape == neg.shape == (2, 77, 48)
    assert torch.allclose(neg[0], translator.encode([""])[0], atol=1e-5)  # unconditional = translator("")
    assert torch.allclose(pos[1], translator.encode(["un chat"])[0], atol=1e-5)


def test_native_embeddings_match_encode_prompt(pipe):
    pos, neg = text_embeddings(pipe, None, ["a red dog"], [""])
    ref_pos, ref_neg = pipe.encode_prompt(["a red dog"], pipe.unet.device, 1, True, negative_prompt=[""])
    assert torch.equal(pos, ref_pos) and torch.equal(neg, ref_neg) and pos.shape == (1, 77, 48)


def test_generate_is_seeded_and_batch_invariant(pipe, translator):
    a = generate(pipe, translator, ["ein Hund", "un chat"], seeds=[3, 7], num_images=2, **KW)
    assert len(a) == 4 and a[0].size == (32, 32)
    b = generate(pipe, translator, ["un chat"], seeds=[7], num_images=2, **KW)
    # an image depends only on its prompt and seed, not on what else shared the batch
    assert np.abs(px(a[2]) - px(b[0])).max() <= 1 and np.abs(px(a[3]) - px(b[1])).max() <= 1
    assert np.abs(px(a[2]) - px(a[3])).max() > 0  # image k of a prompt uses seed + k


def test_run_pipeline_checks_seed_count(pipe, translator):
    pos, neg = text_embeddings(pipe, translator, ["x"], [""])
    with pytest.raises(MTNError, match="seeds"):
        run_pipeline(pipe, pos, neg, [0, 1], **KW)


@pytest.mark.parametrize("name,cls", [("ddim", "DDIMScheduler"), ("pndm", "PNDMScheduler"),
                                      ("dpm", "DPMSolverMultistepScheduler")])
def test_scheduler_choice_keeps_the_noise_schedule(tiny_serving, name, cls):
    p = load_pipeline(str(tiny_serving[0]), scheduler=name)
    assert type(p.scheduler).__name__ == cls
    assert p.scheduler.config.beta_end == pytest.approx(0.012) and p.scheduler.config.beta_schedule == "scaled_linear"
    assert len(generate(p, None, ["a dog"], seeds=[0], **KW)) == 1


def test_tiny_reference_loads_the_builtin_pipeline(pipe):
    p = load_pipeline("tiny:sd", scheduler="ddim")  # what the evaluation job's default `pipeline: tiny:sd` loads
    assert type(p.scheduler).__name__ == "DDIMScheduler" and p.unet.config.cross_attention_dim == 48
    saved = pipe.unet.state_dict()  # the folder conftest saved from build_tiny_sd_pipeline(seed=0)
    assert all(torch.equal(v, saved[k]) for k, v in p.unet.state_dict().items())
    with pytest.raises(MTNError, match="unknown builtin pipeline 'tiny:sdxl'"):
        load_pipeline("tiny:sdxl")


def test_bad_scheduler_and_folder(pipe, tmp_path):
    with pytest.raises(MTNError, match="unknown scheduler 'euler'"):
        set_scheduler(pipe, "euler")
    with pytest.raises(MTNError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_refuses_pipelines_without_prompt_embeds():
    class LDMLike:
        def __call__(self, prompt, num_inference_steps=50):
            pass

    with pytest.raises(MTNError, match="does not accept prompt_embeds"):
        check_takes_embeddings(LDMLike())


def test_translator_for_another_unet_is_refused(translator):
    from diffusers import UNet2DConditionModel

    p = build_tiny_sd_pipeline()
    p.unet = UNet2DConditionModel(block_out_channels=(16, 32), layers_per_block=1, sample_size=8,
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                  attention_head_dim=4, norm_num_groups=8)
    with pytest.raises(MTNError, match="cross-attends to 32"):
        text_embeddings(p, translator, ["x"], [""])
