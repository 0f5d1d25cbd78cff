"""Registering a trained translator (jobs/train_mtn.py's `register_model`, through mtn.train.tracking.upload_outputs):
a new version of the registered model, the alias moved to it, the target space as version tags; the version loads
back from models:/<name>@<alias> with its target space. The whole job: tests/test_train_job.py."""

import shlex

import pytest

from mtn.config import load_config
from mtn.errors import MTNError
from mtn.tiny.translator import build_tiny_translator
from mtn.train.tracking import main, upload_outputs

TAGS = {"mtn.target_encoder": "tiny:clip", "mtn.target_width": "48", "mtn.target_length": "77"}


@pytest.mark.slow
def test_upload_registers_a_version_moves_the_alias_and_tags_the_target_space(mlflow_registry, tmp_path):
    from mtn.translator import load_translator
    from mtn.uris import fetch_folder

    client, exp = mlflow_registry
    folder = build_tiny_translator(seed=0).save(tmp_path / "translator")
    versions = []
    for _ in range(2):  # a second training registers version 2 and the alias follows it
        run_id = client.create_run(exp).info.run_id
        assert upload_outputs(client.tracking_uri, run_id, {}, {"translator": str(folder)}, "x",
                              alias="champion") == "ok"
        versions.append(client.get_model_version_by_alias("x", "champion"))
        assert client.get_run(run_id).data.tags["mtn.registered_model"] == f"models:/x/{len(versions)}"
    assert [int(v.version) for v in versions] == [1, 2]
    for v in versions:
        assert {k: v.tags.get(k) for k in TAGS} == TAGS  # the text space, readable without a download
    tr = load_translator(fetch_folder("models:/x@champion", "translator.json", tmp_path / "cache"))
    assert tr.target_space == {"encoder": "tiny:clip", "subfolder": None, "revision": None, "width": 48,
                               "length": 77, "padding": "max_length"}
    assert tr.encode(["ein Hund"]).shape == (1, 77, 48)


def test_a_failed_upload_prints_a_retry_that_keeps_the_alias(tmp_path, capsys):
    dead = "http://127.0.0.1:9"  # discard port: nothing answers
    upload_outputs(dead, "abc", {}, {"translator": str(tmp_path)}, "x", attempts=1, backoff_s=0.0, alias="champion")
    cmd = shlex.split(capsys.readouterr().err.strip().splitlines()[-1])
    assert cmd[cmd.index("--register") + 1] == "x" and cmd[cmd.index("--alias") + 1] == "champion"
    assert main(["upload", "--tracking-uri", dead, "--register", "x", "--alias", "champion"]) == 2  # no --model


def test_register_fields_are_shared_with_the_finetune_and_checked():
    from mtn.finetune_config import FinetuneConfig

    cfg = load_config(None, ["corpus=generated:10", "register_model=mtn-x"])
    assert cfg.register_model == "mtn-x" and cfg.register_alias == "champion"
    assert load_config(None, ["corpus=generated:10", "register_alias=null"]).register_alias is None
    assert FinetuneConfig(register_model="ft").register_model == "ft"  # the same JobConfig field
    with pytest.raises(MTNError, match="register_model must be a non-empty name or null"):
        load_config(None, ["corpus=generated:10", "register_model= "])
    with pytest.raises(MTNError, match="register_alias must be a non-empty name or null"):
        load_config(None, ["corpus=generated:10", "register_alias= "])


def test_a_sweep_trial_never_registers(monkeypatch, tmp_path):
    """A trial (nested under the sweep's MLflow run) uploads its translator but leaves registering to the sweep."""
    from jobs import train_mtn

    calls = []
    monkeypatch.setattr(train_mtn, "publish", lambda cfg, result: {"translator": "t", "loss_curve": "l",
                                                                    "metrics": "m", "mlflow_run_id": "r"})
    monkeypatch.setattr(train_mtn, "upload_outputs", lambda *a, **kw: calls.append((a, kw)))
    for parent, want in ((None, "mtn-x"), ("parent-run", None)):
        cfg = load_config(None, ["corpus=generated:10", "register_model=mtn-x", f"output_dir={tmp_path}",
                                 f"mlflow_parent_run_id={parent or 'null'}"])
        train_mtn.publish_and_upload(cfg, None)
        args, kw = calls[-1]
        assert args[4] == want and kw["alias"] == "champion"
