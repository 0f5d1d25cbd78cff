"""Result tables of the evaluation job (CSV + Markdown) and the side-by-side comparison of MLflow runs."""

from __future__ import annotations

import csv
import io
import math

from mtn.errors import MTNError


def cell(v) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.4g}"
    return "" if v is None else str(v).replace("|", "/")


def tables(rows: list[dict], columns: list[str]) -> tuple[str, str]:
    """rows -> (CSV text, Markdown text) over `columns` (missing values stay empty)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return buf.getvalue(), "\n".join(md) + "\n"


def compare_table(runs: list[dict]) -> str:
    """runs: [{"id", "name", "metrics": {key: value}}] -> Markdown, one row per metric, one column per run.
    The best value per row (all of them on a tie) is marked (*) where the metric's direction is known."""
    keys = sorted({k for r in runs for k in r["metrics"]})
    head = ["metric"] + [f"{r['name']} ({r['id'][:8]})" for r in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k in keys:
        vals = [r["metrics"].get(k) for r in runs]
        best = _best(k, vals)
        lines.append("| " + " | ".join([k] + [cell(v) + (" *" if i in best else "") for i, v in enumerate(vals)])
                     + " |")
    return "\n".join(lines) + "\n"


LOWER_IS_BETTER = ("token_mse", "fid", "loss")
HIGHER_IS_BETTER = ("r_at_", "r@", "cosine", "clip_score")


def _best(key: str, vals: list) -> set[int]:
    present = [(i, v) for i, v in enumerate(vals) if isinstance(v, (int, float)) and math.isfinite(v)]
    name = key.rsplit("/", 1)[-1]
    if len(present) < 2 or len({v for _, v in present}) == 1:
        return set()
    if any(t in name for t in LOWER_IS_BETTER):
        target = min(v for _, v in present)
    elif any(t in name for t in HIGHER_IS_BETTER):
        target = max(v for _, v in present)
    else:
        return set()
    return {i for i, v in present if v == target}


def fetch_runs(tracking_uri: str, run_ids: list[str]) -> list[dict]:
    """The latest value of every metric of each run (MLflow), in the order given."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    out = []
    for rid in run_ids:
        try:
            run = client.get_run(rid)
        except mlflow.exceptions.MlflowException:
            raise MTNError(f"no MLflow run {rid!r} at {tracking_uri} (set --tracking-uri or MLFLOW_TRACKING_URI)") \
                from None
        out.append({"id": rid, "name": run.info.run_name or rid, "metrics": dict(run.data.metrics)})
    return out
