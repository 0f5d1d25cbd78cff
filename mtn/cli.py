"""`mtn`: the command line. Each job command runs the same `main(argv)` as `python jobs/<job>.py`, with the same
`--config FILE` and `key=value` overrides; `mtn config show <job>` prints the config a job would run with.

    mtn train                                  # jobs/configs/local.yaml: the embedded default
    mtn train --config jobs/configs/multi30k.yaml source_lang=de max_steps=50
    mtn config show sweep "num_modules=[3, 5]"
    mtn serve --port 8080

Jobs are imported only when their command runs: `mtn --help` and `mtn config show` never import torch or Ray.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path


def job_parser(doc: str | None, default_config, what: str = "YAML config",
               example: str = "max_steps=10") -> argparse.ArgumentParser:
    """What every job's command line takes: `--config FILE` (default: the job's own config) and `key=value`
    overrides; a job adds its own flags to the parser it gets."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(default_config), help=f"{what} (default: %(default)s)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"config overrides, e.g. {example}")
    return p


# command -> (module whose main(argv) runs it, its default config under jobs/configs (None: serve), one line of help)
COMMANDS = {
    "train": ("jobs.train_mtn", "local.yaml", "train a translator (MTN) on Ray Train + DeepSpeed"),
    "extract": ("jobs.extract_features", "local.yaml", "run the frozen encoders once and cache their features"),
    "sweep": ("jobs.sweep_mtn", "sweep_local.yaml", "Ray Tune sweep over the training job; registers the best"),
    "evaluate": ("jobs.evaluate", "evaluate_local.yaml", "score a translator: alignment, CLIP score, FID"),
    "finetune": ("jobs.finetune_unet", "finetune_local.yaml", "finetune a diffusion UNet through a translator"),
    "precompute": ("jobs.precompute_latents", "finetune_local.yaml", "precompute VAE latents for the finetune"),
    "serve": ("serve.__main__", None, "the Ray Serve service (HTTP API + page) on 127.0.0.1:8000"),
}
# command -> (module, class) of its config
CONFIG_CLASSES = {
    "train": ("mtn.train_config", "TrainConfig"), "extract": ("mtn.train_config", "TrainConfig"),
    "sweep": ("mtn.sweep", "SweepConfig"), "evaluate": ("mtn.eval.config", "EvalConfig"),
    "finetune": ("mtn.finetune_config", "FinetuneConfig"), "precompute": ("mtn.finetune_config", "FinetuneConfig"),
}


def usage() -> str:
    lines = ["usage: mtn <command> [--config FILE] [key=value ...]", "",
             "Plug new language models into text-to-image diffusion models (Model Translation Network).", "",
             "commands:"]
    lines += [f"  {name:<12} {text}" for name, (_, _, text) in COMMANDS.items()]
    lines += [f"  {'config show':<12} print a command's resolved config as YAML: "
              "mtn config show <command> [--config FILE] [key=value ...]",
              f"  {'data fetch':<12} download Multi30k / PartiPrompts into the data root: "
              "mtn data fetch <multi30k|prompts|all> [--root DIR|s3://...] [--base-url URL]", "",
              "`mtn <command> --help` lists a command's options; key=value overrides any config key "
              "(lists as YAML: \"num_modules=[3, 5]\")."]
    return "\n".join(lines)


def default_config(command: str) -> Path | None:
    """The config a job runs without --config: jobs/configs/<name> inside the installed `jobs` package."""
    name = COMMANDS[command][1]
    return None if name is None else Path(importlib.util.find_spec("jobs").origin).parent / "configs" / name


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error; a user mistake here is one line, exit 2
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        sys.exit(2)


def config_show(argv: list[str]) -> int:
    p = _OneLineParser(prog="mtn config show", description="print a command's resolved config as YAML")
    p.add_argument("command", help=", ".join(COMMANDS))
    p.add_argument("--config", help="YAML config (default: the command's own)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    ns = p.parse_intermixed_args(argv)
    if ns.command not in COMMANDS:
        return _unknown(ns.command, "mtn config show")

    import yaml

    from mtn.errors import MTNError

    try:
        resolved = _resolved(ns.command, ns.config, ns.overrides)
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    source = ns.config or default_config(ns.command) or "the built-in default"
    print(f"# mtn {ns.command}: {source}{' + overrides' if ns.overrides else ''}, resolved")
    print(yaml.dump(resolved, Dumper=_dumper(), sort_keys=False, allow_unicode=True), end="")
    return 0


def _dumper():
    """SafeDumper writing lists of scalars on one line (`num_modules: [3, 5]`, as the configs do), mappings as blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(list, lambda d, v: d.represent_sequence(
        "tag:yaml.org,2002:seq", v, flow_style=not any(isinstance(x, (list, dict)) for x in v)))
    return Dumper


def _resolved(command: str, config: str | None, overrides: list[str]) -> dict:
    if command == "serve":
        from serve.__main__ import default_args
        from serve.config import AppArgs, load_app_args

        return AppArgs.model_validate(load_app_args(config, overrides, None if config else default_args())).model_dump()
    from mtn.config import load_config

    module, cls = CONFIG_CLASSES[command]
    return load_config(config or default_config(command), overrides,
                       cls=getattr(importlib.import_module(module), cls)).to_dict()


def data_command(argv: list[str]) -> int:
    """`mtn data fetch NAME...`: mtn.data.fetch (pinned sha256s, atomic, resumable)."""
    p = _OneLineParser(prog="mtn data", description="the public data files the real-data configs read")
    sub = p.add_subparsers(dest="action", required=True, parser_class=_OneLineParser)
    f = sub.add_parser("fetch", help="download datasets into the data root (files already there are checked, kept)")
    f.add_argument("names", nargs="+", metavar="NAME", help="multi30k, prompts, or all")
    f.add_argument("--root", help="data root: a folder or fsspec URL (default: $MTN_SHARED_DATA, else "
                                  "the configs' data_root default)")
    f.add_argument("--base-url", help="fetch <URL>/<path under the root> from this mirror instead "
                                      "(default: $MTN_DATA_BASE_URL, else the public sources)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    ns = p.parse_args(argv)

    from mtn.data.fetch import fetch
    from mtn.errors import MTNError

    try:
        files = fetch(ns.names, root=ns.root, base_url=ns.base_url, progress=not ns.quiet)
    except MTNError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(files)} file(s) in place")
    return 0


def _unknown(command: str, where: str) -> int:
    names = [*COMMANDS, "config", "data"]
    near = difflib.get_close_matches(command, names, 1)
    hint = f" (did you mean {near[0]!r}?)" if near else f" (one of: {', '.join(names)})"
    print(f"error: {where}: unknown command {command!r}{hint}; see mtn --help", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    as_script, argv = argv is None, sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "config":
        if not rest or rest[0] != "show":
            print("error: mtn config: the only subcommand is `show`: mtn config show <command> [--config FILE] "
                  "[key=value ...]", file=sys.stderr)
            return 2
        return config_show(rest[1:])
    if command == "data":
        return data_command(rest)
    if command not in COMMANDS:
        return _unknown(command, "mtn")
    if as_script:  # the console script's own process: the job's argparse then says `usage: mtn train ...`
        sys.argv[0] = f"mtn {command}"
    return importlib.import_module(COMMANDS[command][0]).main(rest) or 0  # serve's main returns None
