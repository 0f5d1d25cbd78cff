"""The `mtn` command line, in process: help, dispatch to the jobs' main(argv), `config show`, one-line errors."""

import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from mtn.cli import COMMANDS, default_config, main

ROOT = Path(__file__).resolve().parents[1]


def test_help_lists_every_command_with_one_line(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in [*COMMANDS, "config show"]:
        assert re.search(rf"^  {name} +\S", out, re.M), f"{name} missing from mtn --help"
    assert main([]) == 2 and "usage: mtn" in capsys.readouterr().err


def test_help_and_config_show_import_no_job():
    """`mtn --help` and `mtn config show` stay fast: neither torch nor Ray nor a job is imported."""
    code = ("import sys; from mtn.cli import main; main(['--help']); main(['config', 'show', 'train']); "
            "main(['config', 'show', 'finetune']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'ray', 'jobs', 'deepspeed')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "[]"


def test_default_configs_match_the_jobs():
    for command, (module, _, _) in COMMANDS.items():
        if command == "serve":
            continue
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        name = re.search(r'^DEFAULT_CONFIG = Path\(__file__\)\.parent / "configs" / "([\w.]+)"', source, re.M)
        assert name and default_config(command) == ROOT / "jobs" / "configs" / name.group(1), command
        assert default_config(command).is_file()


@pytest.mark.parametrize("command,module", [("train", "jobs.train_mtn"), ("finetune", "jobs.finetune_unet"),
                                            ("serve", "serve.__main__")])
def test_a_command_runs_the_jobs_main_with_the_same_arguments(monkeypatch, command, module):
    seen = []
    fake = types.ModuleType(module)
    fake.main = lambda argv: seen.append(argv) or (None if command == "serve" else 3)
    monkeypatch.setitem(sys.modules, module, fake)  # import_module finds it there: no torch, no Ray
    rc = main([command, "--config", "x.yaml", "max_steps=5", "num_modules=[3, 5]"])
    assert seen == [["--config", "x.yaml", "max_steps=5", "num_modules=[3, 5]"]]
    assert rc == (0 if command == "serve" else 3)


def test_config_show_prints_the_resolved_config(monkeypatch, tmp_path, capsys):
    import yaml

    monkeypatch.setenv("MTN_SHARED_DATA", str(tmp_path / "data"))
    assert main(["config", "show", "evaluate", "max_prompts=3", "languages=[de, fr]",
                 "prompts={data_root}/prompts/PartiPrompts.tsv"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# mtn evaluate: ") and "evaluate_local.yaml + overrides" in out.splitlines()[0]
    cfg = yaml.safe_load(out)
    assert cfg["max_prompts"] == 3 and cfg["languages"] == ["de", "fr"] and cfg["guidance_scales"] == [1.5, 5.0, 7.5]
    assert cfg["data_root"] == str(tmp_path / "data")  # ${MTN_SHARED_DATA:-...}
    assert cfg["prompts"] == f"{tmp_path}/data/prompts/PartiPrompts.tsv"  # {data_root} reference
    assert cfg["name"] == "mtn-eval-local"  # from the YAML


def test_config_show_of_a_given_file_reloads_to_the_same_config(tmp_path, capsys):
    """What `config show` prints is itself a config: the job would run the same values from it."""
    from mtn.config import load_config
    from mtn.sweep import SweepConfig

    assert main(["config", "show", "sweep", "--config", str(ROOT / "jobs/configs/ablations/losses.yaml"),
                 "num_samples=3"]) == 0
    shown = tmp_path / "shown.yaml"
    shown.write_text(capsys.readouterr().out)
    again = load_config(shown, cls=SweepConfig)
    assert again.num_samples == 3 and list(again.variant_map()) == ["mse", "+rec", "+adv", "+cycle"]
    assert again == load_config(ROOT / "jobs/configs/ablations/losses.yaml", ["num_samples=3"], cls=SweepConfig)


def test_config_show_serve(capsys):
    assert main(["config", "show", "serve", "--config", str(ROOT / "serve/config.yaml"), "limits.max_steps=20"]) == 0
    out = capsys.readouterr().out
    assert "  max_steps: 20\n" in out and "pipeline: " in out


@pytest.mark.parametrize("argv,message", [
    (["trian"], "error: mtn: unknown command 'trian' (did you mean 'train'?); see mtn --help"),
    (["config", "show", "train", "lrr=1"], "error: unknown config key: 'lrr' (did you mean 'lr'?)"),
    (["config", "show", "train", "max_steps=many"], "error: config: max_steps must be int, got 'many'"),
    (["config", "show", "sweep", "num_modules=3,5"],
     "error: config: num_modules must be a YAML list like [a, b], not '3,5'"),
    (["config", "show", "serve", "limits.max_widht=3"],
     "error: invalid app args: unknown config key: 'limits.max_widht' (did you mean 'limits.max_width'?)"),
    (["config", "show", "trainn"], "error: mtn config show: unknown command 'trainn' (did you mean 'train'?)"),
    (["config", "show", "train", "--config", "nope.yaml"], "error: config file not found: nope.yaml"),
    (["config", "list"], "error: mtn config: the only subcommand is `show`"),
    (["config", "show", "train", "--bogus"], "error: mtn config show: unrecognized arguments: --bogus"),
])
def test_mistakes_are_one_line_exit_2(capsys, argv, message):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors (here: one line too)
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and err.startswith(message) and err.count("\n") == 1 and not out, err
