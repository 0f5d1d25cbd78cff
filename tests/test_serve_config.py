from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from serve.__main__ import args_from_config, default_args
from serve.config import AppArgs

ROOT = Path(__file__).resolve().parent.parent


def test_serve_config_passes_ray_schema_and_app_args():
    doc = yaml.safe_load((ROOT / "serve/config.yaml").read_text())
    ServeDeploySchema.model_validate(doc)
    app = doc["applications"][0]
    assert app["import_path"] == "serve.app:build_app"
    AppArgs.model_validate(args_from_config(str(ROOT / "serve/config.yaml")))
    assert {d["name"] for d in app["deployments"]} == {"Generator", "Ingress"}


def test_default_args_are_valid(tmp_path):
    args = AppArgs.model_validate(default_args(tmp_path))
    assert args.translators == {"multi": str(tmp_path / "outputs/local/translator")} and args.device == "cpu"


def test_build_app_validates_before_any_replica():
    import pytest
    from pydantic import ValidationError

    from serve.app import build_app

    with pytest.raises(ValidationError, match="hybrid_route"):
        build_app({"pipeline": "x", "hybrid_route": "zz"})
    from ray.serve.deployment import Application

    app = build_app({"pipeline": "x"})
    assert isinstance(app, Application) and app._bound_deployment.name == "Ingress"  # the HTTP ingress, bound


def test_python_m_serve_bad_config_is_one_line(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("applications: [{args: {pipeline: x, scheduler: euler}}]\n")
    keyless = tmp_path / "keyless.yaml"  # auth required, the key variable empty: refused before Ray starts
    keyless.write_text("applications: [{args: {pipeline: x, auth: {api_keys_env: MTN_TEST_NO_KEYS, required: true}}}]\n")
    env = {k: v for k, v in os.environ.items() if k != "MTN_TEST_NO_KEYS"}
    for argv, msg in (([str(tmp_path / "missing.yaml")], "is not a serve config"), ([str(bad)], "invalid app args"),
                      ([str(keyless)], "error: auth.required is true but the environment variable MTN_TEST_NO_KEYS "
                                       "holds no API key")):
        p = subprocess.run([sys.executable, "-m", "serve", "--config", *argv], cwd=ROOT, capture_output=True,
                           text=True, timeout=120, env=env)
        assert p.returncode == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr


def test_app_args_load_through_the_jobs_loader(monkeypatch, tmp_path):
    """serve/config.yaml's args + key=value overrides (dotted for nested models) + ${ENV:-default}; one-line errors."""
    import pytest

    from mtn.errors import MTNError
    from serve.config import load_app_args

    monkeypatch.setenv("MTN_TEST_PIPE", str(tmp_path / "pipe"))
    args = load_app_args(str(ROOT / "serve/config.yaml"), ["limits.max_steps=20", "pipeline=${MTN_TEST_PIPE:-x}"])
    assert args["limits"]["max_steps"] == 20 and args["pipeline"] == str(tmp_path / "pipe")
    assert AppArgs.model_validate(args).limits.max_width == AppArgs.model_validate(
        args_from_config(str(ROOT / "serve/config.yaml"))).limits.max_width  # untouched keys stay
    assert load_app_args(None, ["dtype=float32"], {"pipeline": "p"}) == {"pipeline": "p", "dtype": "float32"}
    for overrides, match in ((["limits.max_widht=9"], r"'limits.max_widht' \(did you mean 'limits.max_width'\?\)"),
                             (["limits.max_steps=0"], "limits.max_steps input should be greater than or equal to 1"),
                             (["hybrid_route=zz"], "hybrid_route='zz' is neither")):
        with pytest.raises(MTNError, match=match) as e:
            load_app_args(None, overrides, {"pipeline": "p"})
        assert str(e.value).startswith("invalid app args: ") and "\n" not in str(e.value)
