"""The embedded default translator of the local demo, trained with the default job when it is missing.

`python -m serve` and `python jobs/evaluate.py` (with `train_if_missing: true`) call `ensure_default_translator`
before loading it: the library (mtn/) never starts a job, the jobs and the service do.
"""

from __future__ import annotations

from pathlib import Path

from mtn.config import IN_CHECKOUT, REPO_ROOT
from mtn.errors import MTNError
from mtn.translator import MANIFEST

# jobs/configs/local.yaml's output_dir, anchored at the checkout (installed: at the working directory, never
# inside site-packages)
DEFAULT_OUTPUT = (REPO_ROOT if IN_CHECKOUT else Path.cwd()) / "outputs" / "local"
DEFAULT_TRANSLATOR = DEFAULT_OUTPUT / "translator"


def ensure_default_translator(path: str | Path) -> Path:
    """`path` as it is, after training the default job into it first when `path` is the default translator
    (outputs/local/translator) and that is missing. Raises MTNError when the training fails."""
    path = Path(path)
    if path.resolve() != DEFAULT_TRANSLATOR or (DEFAULT_TRANSLATOR / MANIFEST).is_file():
        return path
    from jobs import train_mtn  # in-process: its Ray session starts and ends inside main()

    print("no default translator yet: training one with the default job (`python jobs/train_mtn.py`; a few "
          "minutes on CPU) ...", flush=True)
    rc = train_mtn.main(["--config", str(train_mtn.DEFAULT_CONFIG), f"output_dir={DEFAULT_OUTPUT}"])
    if rc != 0 or not (DEFAULT_TRANSLATOR / MANIFEST).is_file():
        raise MTNError(f"the default training job failed (exit {rc}); run `python jobs/train_mtn.py` to see why")
    return path
