from pathlib import Path

import pytest

from mtn.config import load_config
from mtn.errors import MTNError
from mtn.finetune_config import FinetuneConfig
from mtn.train_config import TrainConfig

REPO = Path(__file__).parents[1]
CONFIG_DIR = REPO / "jobs" / "configs"
CONFIGS = sorted((Path(__file__).parents[1] / "jobs" / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert {"local.yaml", "multi30k.yaml"} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_instantiates(path):
    text = path.read_text()
    assert "python jobs/" in text.split("\n\n")[0], f"{path.name}: header must show the command that runs it"
    assert f"jobs/configs/{path.relative_to(CONFIG_DIR)}" in text.split("\n\n")[0] or path.name.endswith("local.yaml"), \
        f"{path.name}: header command must name this config"
    if "python jobs/sweep_mtn.py" in text.split("\n\n")[0]:
        from mtn.sweep import SweepConfig, search_space

        cfg = load_config(path, cls=SweepConfig)
        assert (REPO / cfg.base_config).is_file() and search_space(cfg)
        for overrides in cfg.variant_map().values():  # every variant is a valid training config
            load_config(REPO / cfg.base_config, [*cfg.base_overrides, *overrides])
        return
    if "python jobs/evaluate.py" in text.split("\n\n")[0]:
        from mtn.eval.config import EvalConfig

        assert isinstance(load_config(path, cls=EvalConfig), EvalConfig)
        return
    if "python jobs/finetune_unet.py" in text.split("\n\n")[0]:
        cfg = load_config(path, cls=FinetuneConfig)
        assert "{output_dir}" not in cfg.train_shards + cfg.storage_path and "{" not in cfg.output_dir
        return
    cfg = load_config(path)
    assert isinstance(cfg, TrainConfig)
    assert "{" not in cfg.output_dir and "${" not in cfg.source_encoder


def test_overrides_types_and_templates(monkeypatch, tmp_path):
    monkeypatch.setenv("MTN_SHARED_DATA", str(tmp_path))
    cfg = load_config(CONFIG_DIR / "multi30k.yaml", ["source_lang=fr", "lr=1e-4", "max_steps=7",
                                                            "use_gpu=true", "hidden_dim=null"])
    assert cfg.source_file == f"{tmp_path}/multi30k/train.fr.gz"
    assert cfg.name == "mtn-multi30k-fr" and cfg.output_dir == "outputs/multi30k-fr"
    assert cfg.lr == pytest.approx(1e-4) and cfg.max_steps == 7 and cfg.use_gpu is True and cfg.hidden_dim is None
    assert load_config(None, ["corpus=generated:10"]).corpus == "generated:10"


@pytest.mark.parametrize("overrides,match", [
    (["lrr=0.1"], r"unknown config key: 'lrr' \(did you mean 'lr'\?\)"),
    (["max_steps=many"], "max_steps must be int"),
    (["zero_stage=4"], "zero_stage must be 0-3"),
    (["max_steps"], "is not key=value"),
    (["loss_mse=0", "loss_rec=0", "loss_cycle=0"], "all loss weights are 0"),
    (["source_file=a.txt"], "not both"),
])
def test_bad_configs_are_refused_with_a_message(overrides, match):
    with pytest.raises(MTNError, match=match):
        load_config(CONFIG_DIR / "local.yaml", overrides)


def test_missing_config_file():
    with pytest.raises(MTNError, match="config file not found"):
        load_config("nope.yaml")


def test_override_values_that_look_like_yaml_mappings_stay_strings():
    from mtn.config import parse_overrides

    assert parse_overrides(["source_file={data_root}/t.de.gz", "x={source_lang}", "n=3", "v=null"]) == {
        "source_file": "{data_root}/t.de.gz", "x": "{source_lang}", "n": 3, "v": None}


def test_lists_are_yaml_lists():
    from mtn.sweep import SweepConfig

    assert load_config(None, ["num_modules=[3, 5]"], cls=SweepConfig).num_modules == [3, 5]
    assert load_config(None, ["num_modules=4", "hidden_dims="], cls=SweepConfig).num_modules == [4]  # a list of one
    assert load_config(None, ["hidden_dims="], cls=SweepConfig).hidden_dims == []
    with pytest.raises(MTNError, match=r"num_modules must be a YAML list like \[a, b\], not '3,5'"):
        load_config(None, ["num_modules=3,5"], cls=SweepConfig)
    cfg = load_config(None, {"val_prompts": "a dog, running"}, cls=FinetuneConfig)  # commas belong to a prompt
    assert cfg.val_prompts == ["a dog, running"]
    with pytest.raises(MTNError, match="val_prompts must be a YAML list"):
        load_config(None, {"val_prompts": "a dog|a cat"}, cls=FinetuneConfig)


def test_config_round_trips_through_to_dict_and_assignment():
    """Ray workers rebuild the config from cfg.to_dict(); the driver assigns resolved values."""
    cfg = load_config(CONFIG_DIR / "multi30k.yaml", ["source_lang=de"])
    assert TrainConfig(**cfg.to_dict()) == cfg and cfg.languages == ["de", "fr", "cs"]
    cfg.precision = "bf16"
    assert cfg.to_dict()["precision"] == "bf16"
    with pytest.raises(MTNError, match="zero_stage must be 0-3"):
        FinetuneConfig(**{**FinetuneConfig().to_dict(), "zero_stage": 7})


def test_job_configs_share_one_base_and_one_path_resolution(monkeypatch, tmp_path):
    from mtn.eval.config import EvalConfig
    from mtn.sweep import SweepConfig
    from mtn.train.config import JobConfig

    assert issubclass(TrainConfig, JobConfig) and issubclass(FinetuneConfig, JobConfig)
    assert FinetuneConfig(lr_schedule="cosine", lr_min_ratio=0.2).lr_min_ratio == 0.2  # the shared schedule's field
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(None, ["output_dir=out", "feature_cache=s3://b/f", "corpus=generated:10"]).resolve_paths()
    assert cfg.output_dir == str(tmp_path / "out") and cfg.storage_path == str(tmp_path / "out/ray_results")
    assert cfg.feature_cache == "s3://b/f" and cfg.mlflow_tracking_uri == f"sqlite:///{tmp_path}/out/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    for cls in (FinetuneConfig, EvalConfig, SweepConfig):
        cfg = cls(output_dir="o").resolve_paths()
        assert cfg.output_dir == str(tmp_path / "o") and cfg.mlflow_tracking_uri == "http://mlflow:5000", cls
    assert FinetuneConfig(mlflow_tracking_uri="sqlite:///x.db").resolve_paths().mlflow_tracking_uri == "sqlite:///x.db"


def test_yaml_mistakes_are_one_line(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("lr: 1.0e-3\nmax_steps: 5\nlr: 1.0e-2\n")
    with pytest.raises(MTNError, match=r"twice.yaml: config key 'lr' given twice \(lines 1 and 3\)"):
        load_config(twice)
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    with pytest.raises(MTNError, match="is not valid YAML") as e:
        load_config(bad)
    assert "\n" not in str(e.value)
    many = "; ".join(["max_steps=x", "zero_stage=y"])
    with pytest.raises(MTNError) as e:
        load_config(None, many.split("; "))
    assert str(e.value) == "config: max_steps must be int, got 'x'; config: zero_stage must be int, got 'y'"


SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("name,source,registered", [
    ("xlmr-large_sd15.yaml", "FacebookAI/xlm-roberta-large", "mtn-xlmr-large-sd15"),
    ("e5-large_sd15.yaml", "intfloat/multilingual-e5-large", "mtn-e5-large-sd15"),
    ("t5-3b_sd15.yaml", "google-t5/t5-3b", "mtn-t5-3b-sd15"),
    ("openclip_clip-l.yaml", "laion/CLIP-ViT-L-14-laion2B-s32B-b82K", "mtn-openclip-l-sd15"),
])
def test_real_pairings_write_sd15_text_as_the_unet_consumes_it_with_the_recipe(name, source, registered):
    cfg = load_config(CONFIG_DIR / name)
    assert (cfg.source_encoder, cfg.register_model, cfg.register_alias) == (source, registered, "champion")
    # all 77 positions of SD 1.5's CLIP, padding included
    assert (cfg.target_encoder, cfg.target_subfolder, cfg.target_max_length) == (SD15, "text_encoder", 77)
    assert not cfg.mse_on_mask and cfg.cache_target_padding
    recipe = load_config(CONFIG_DIR / "multi30k.yaml")  # the winning recipe
    keys = ("block_layout", "num_modules", "decoder_modules", "standardize", "loss_rec", "loss_cycle", "lr",
            "weight_decay", "lr_schedule", "lr_min_ratio", "batch_size", "precision")
    assert {k: getattr(cfg, k) for k in keys} == {k: getattr(recipe, k) for k in keys}


def test_the_finetune_consumes_the_t5_translator_in_its_own_text_space():
    ft = load_config(CONFIG_DIR / "finetune_sd14_t5.yaml", cls=FinetuneConfig)
    t5 = load_config(CONFIG_DIR / "t5-3b_sd15.yaml")
    assert ft.translator == f"models:/{t5.register_model}@{t5.register_alias}"
    assert ft.pipeline == f"{t5.target_encoder}@{t5.target_revision}" == f"{SD15}@{t5.target_revision}"  # one text space
