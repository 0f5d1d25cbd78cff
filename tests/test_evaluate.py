import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtn.errors import MTNError
from mtn.eval.prompts import read_parallel, read_prompts
from mtn.eval.report import compare_table, tables
from mtn.eval.tsne import tsne_map

ROOT = Path(__file__).resolve().parents[1]


def load_job():
    from jobs import evaluate

    return evaluate


# ------------------------------------------------------------------------------------------- prompt sets
def test_prompt_formats(tmp_path):
    (tmp_path / "p.txt").write_text("a red dog\n\n  a cat  \n")
    (tmp_path / "parti.tsv").write_text("Prompt\tCategory\nbond\tAbstract\nan owl\tAnimals\n")
    (tmp_path / "coco.json").write_text(json.dumps({"annotations": [{"caption": "a man"}, {"caption": "a boat"}]}))
    with gzip.open(tmp_path / "p.de.gz", "wt") as f:
        f.write("ein roter Hund\neine Katze\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red dog", "a cat"]
    assert read_prompts(str(tmp_path / "parti.tsv")) == ["bond", "an owl"]
    assert read_prompts(str(tmp_path / "coco.json"), limit=1) == ["a man"]
    assert read_parallel(str(tmp_path / "p.de.gz"), str(tmp_path / "p.txt")) == (
        ["ein roter Hund", "eine Katze"], ["a red dog", "a cat"])
    assert read_parallel(str(tmp_path / "p.txt"), None) == (["a red dog", "a cat"], ["a red dog", "a cat"])


@pytest.mark.parametrize("name,text,match", [
    ("missing.txt", None, "not found"),
    ("empty.txt", "\n\n", "holds no prompts"),
    ("bad.tsv", "Text\nx\n", "'Prompt' column"),
    ("bad.json", "{}", "annotations"),
])
def test_bad_prompt_files(tmp_path, name, text, match):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(MTNError, match=match):
        read_prompts(str(tmp_path / name))


def test_misaligned_reference_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("x\ny\n")
    (tmp_path / "b.txt").write_text("x\n")
    with pytest.raises(MTNError, match="line i of one must translate"):
        read_parallel(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))


# ------------------------------------------------------------------------------------------- reports, map
def test_tables_and_compare_marks_the_best():
    csv_text, md = tables([{"a": 1.23456, "b": None}], ["a", "b"])
    assert csv_text.splitlines() == ["a,b", "1.23456,"] and "| 1.235 |  |" in md
    runs = [{"id": "aaaaaaaaaa", "name": "r1", "metrics": {"align/de/token_mse": 0.2, "gen/g7.5/clip_score": 30.0}},
            {"id": "bbbbbbbbbb", "name": "r2", "metrics": {"align/de/token_mse": 0.1, "gen/g7.5/clip_score": 20.0,
                                                           "steps": 3.0}},
            {"id": "cccccccccc", "name": "r3", "metrics": {"align/de/token_mse": 0.1, "gen/g7.5/clip_score": 30.0}}]
    lines = compare_table(runs).splitlines()
    assert lines[0] == "| metric | r1 (aaaaaaaa) | r2 (bbbbbbbb) | r3 (cccccccc) |"
    assert "| align/de/token_mse | 0.2 | 0.1 * | 0.1 * |" in lines  # lower is better; ties all marked
    assert "| gen/g7.5/clip_score | 30 * | 20 | 30 * |" in lines
    assert "| steps |  | 3 |  |" in lines  # missing in a run: empty; no known direction: no mark


def test_tsne_map_with_different_source_width(tmp_path):
    rng = np.random.default_rng(0)
    groups = {lg: {"source": rng.normal(size=(20, 12)), "target": rng.normal(size=(20, 8)),
                   "translated": rng.normal(size=(20, 8))} for lg in ("en", "de")}
    path = tsne_map(groups, tmp_path / "tsne.png")
    with Image.open(path) as im:
        assert im.size == (770, 660) and im.mode == "RGBA"  # figsize (7, 6) inches at 110 dpi
        px = np.asarray(im.convert("RGB")).astype(int).reshape(-1, 3)  # [H * W, 3]
    r, g, b = px.T
    # target points are tab:blue, translated tab:orange (alpha 0.6 over white): both colours are on the map
    assert ((b - r > 60) & (g > 140)).sum() > 50 and ((r - b > 100) & (r > 220)).sum() > 50
    assert (px == 255).all(1).mean() > 0.5  # mostly white background: points, not a filled canvas


# ------------------------------------------------------------------------------------------- the job
@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
    from mtn.tiny.translator import build_tiny_translator

    d = tmp_path_factory.mktemp("eval")
    build_tiny_translator(source_len=24).save(d / "translator")
    (d / "test.en").write_text("\n".join(f"a {c} dog runs on the beach" for c in ("red", "blue", "green", "black",
                                                                               "white", "brown")) + "\n")
    (d / "test.de").write_text("\n".join(f"ein {c} Hund rennt am Strand" for c in ("roter", "blauer", "gruener",
                                                                                 "schwarzer", "weisser", "brauner"))
                               + "\n")
    (d / "prompts.de").write_text("ein roter Hund\neine Katze im Schnee\nein Boot\n")
    (d / "prompts.en").write_text("a red dog\na cat in the snow\na boat\n")
    return d


def job_overrides(d: Path, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", f"translator={d / 'translator'}", "languages=[en, de]",
            f"align_source_file={d}/test.{{lang}}", f"align_target_file={d}/test.en", "tsne_samples=6",
            f"prompts={d}/prompts.de", f"prompts_reference={d}/prompts.en", "guidance_scales=[1.5, 7.5]", "steps=2",
            "batch_size=2", "fid_features=tiny", f"mlflow_tracking_uri=sqlite:///{d}/mlflow.db", *extra]


def _hand_alignment(d: Path, lang: str) -> tuple[float, float, float, float]:
    """token MSE, pooled cosine, R@1 and R@5 of test.<lang> -> test.en, by their definitions (mtn/metrics.py)."""
    import torch
    import torch.nn.functional as F

    from mtn.encoders import load_text_encoder
    from mtn.translator import load_translator

    tr = load_translator(d / "translator")
    spec = tr.manifest["target_encoder"]
    target = load_text_encoder(spec["name_or_path"], max_length=spec["max_length"])
    with torch.no_grad():
        hidden, source_mask = tr.source_encoder((d / f"test.{lang}").read_text().splitlines(), zero_pad=True)
        pred = tr.mtn.encode(hidden, source_mask)  # [6, S_t, d_t]
        true, mask = target((d / "test.en").read_text().splitlines(), zero_pad=True)  # [6, S_t, d_t], [6, S_t]
    m = mask.float().unsqueeze(-1)  # [6, S_t, 1]
    mse = float(((pred - true) ** 2).mean(-1, keepdim=True).mul(m).sum() / m.sum())
    p, t = (pred * m).sum(1) / m.sum(1), (true * m).sum(1) / m.sum(1)  # [6, d_t] each
    sim = F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).T  # [6, 6]: prediction i against every caption
    rank = (sim > sim.diagonal()[:, None]).sum(1)  # [6]: captions scored above the right one
    return mse, float(F.cosine_similarity(p, t, dim=-1).mean()), float((rank < 1).float().mean()), float(
        (rank < 5).float().mean())


def _hand_generation(out: Path, route: str, guidance: float) -> tuple[float, float, float]:
    """CLIP score, M-CLIP score (vs the English / German prompts) and FID (vs the native route) of saved images."""
    from mtn.eval.clip import clip_score_torchmetrics, multilingual_clip_score
    from mtn.eval.fid import build_feature_extractor, compute_fid

    def images(r):
        return [Image.open(f).convert("RGB") for f in sorted((out / "images" / f"{r}-g{guidance:g}").glob("*.png"))]

    notes = json.loads((out / "metrics.json").read_text())["notes"]  # the folders tiny:clip-vit / tiny:mclip became
    en, de = ["a red dog", "a cat in the snow", "a boat"], ["ein roter Hund", "eine Katze im Schnee", "ein Boot"]
    fid = compute_fid(images("translated"), images("native"), build_feature_extractor("tiny"))
    return (clip_score_torchmetrics(images(route), en, notes["clip_model"]),
            multilingual_clip_score(images(route), de, notes["clip_model"], notes["mclip_model"]), fid)


def test_evaluate_job_produces_every_metric(eval_setup, tmp_path, capsys):
    import mlflow

    job = load_job()
    out = tmp_path / "out"
    assert job.main(job_overrides(eval_setup, out)) == 0
    summary = json.loads((out / "metrics.json").read_text())
    align = {r["language"]: r for r in summary["alignment"]}
    assert set(align) == {"en", "de"} and all(r["pairs"] == 6 for r in align.values())
    for lang, r in align.items():  # the metrics' definitions, recomputed here from the translator and the texts
        mse, cos, r1, r5 = _hand_alignment(eval_setup, lang)
        assert r["token_mse"] == pytest.approx(mse, rel=1e-4) and r["pooled_cosine"] == pytest.approx(cos, abs=1e-5)
        assert (r["r@1"], r["r@5"]) == pytest.approx((r1, r5))
    gen = summary["generation"]
    assert [(r["route"], r["guidance"]) for r in gen] == [("translated", 1.5), ("native", 1.5), ("translated", 7.5),
                                                           ("native", 7.5)]
    for r in gen:  # each score recomputed from the PNGs the job saved, with the metric models it built
        assert r["images"] == 3 and (r["route"] == "translated") == ("fid" in r)  # FID: translated vs native
        clip, mclip, fid = _hand_generation(out, r["route"], r["guidance"])
        assert r["clip_score"] == pytest.approx(clip, abs=1e-3) and r["mclip_score"] == pytest.approx(mclip, abs=1e-3)
        assert r.get("fid", fid) == pytest.approx(fid, rel=1e-4)
    assert "smoke" in summary["notes"]["fid_features"]
    assert (out / "tsne.png").is_file() and len(list((out / "images" / "translated-g7.5").glob("*.png"))) == 3
    assert (out / "alignment.md").read_text().count("\n") == 4 and (out / "generation.csv").is_file()

    mlflow.set_tracking_uri(f"sqlite:///{eval_setup}/mlflow.db")
    run = mlflow.search_runs(experiment_names=["mtn-eval"], output_format="list")[0]
    assert {"align/de/r_at_1", "align/en/token_mse", "gen/translated/g7.5/clip_score", "gen/translated/g1.5/fid",
            "gen/native/g7.5/mclip_score"} <= set(run.data.metrics)
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"tsne.png", "alignment.md", "generation.md", "metrics.json", "grids"} <= arts

    # the same seeds and prompts give the same images, hence the same metrics; --compare puts runs side by side
    assert job.main(job_overrides(eval_setup, tmp_path / "out2", "guidance_scales=7.5", "languages=de")) == 0
    again = json.loads((tmp_path / "out2" / "metrics.json").read_text())
    assert again["generation"][0]["clip_score"] == pytest.approx(gen[2]["clip_score"], abs=1e-4)
    assert again["alignment"][0]["token_mse"] == pytest.approx(align["de"]["token_mse"], rel=1e-5)
    ids = [r.info.run_id for r in mlflow.search_runs(experiment_names=["mtn-eval"], output_format="list")]
    capsys.readouterr()
    assert job.main([f"mlflow_tracking_uri=sqlite:///{eval_setup}/mlflow.db", "--compare", *ids]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| metric |") and "gen/translated/g7.5/clip_score" in table and ids[1][:8] in table


def test_fid_against_a_folder_then_its_saved_stats(eval_setup, tmp_path):
    """A reference folder gives FID 0 for the very images it holds; its stats are saved and give the same FID."""
    from mtn.eval.fid import build_feature_extractor, compute_fid

    job = load_job()
    first = tmp_path / "first"
    assert job.main(job_overrides(eval_setup, first, "guidance_scales=7.5", "languages=de", "tsne=false",
                                  "clip_model=null")) == 0
    folder = first / "images" / "translated-g7.5"
    second = tmp_path / "second"
    assert job.main(job_overrides(eval_setup, second, "guidance_scales=7.5", "languages=de", "tsne=false",
                                  "clip_model=null", f"fid_reference={folder}")) == 0
    gen = json.loads((second / "metrics.json").read_text())["generation"]
    assert [r["route"] for r in gen] == ["translated"] and gen[0]["fid"] == pytest.approx(0, abs=1e-6)
    assert "clip_score" not in gen[0] and "mclip_score" not in gen[0]  # no CLIP model: no CLIP scores
    third = tmp_path / "third"
    assert job.main(job_overrides(eval_setup, third, "guidance_scales=1.5", "languages=de", "tsne=false",
                                  "clip_model=null", f"fid_reference={second / 'fid_reference.npz'}")) == 0
    fid_npz = json.loads((third / "metrics.json").read_text())["generation"][0]["fid"]
    again = [Image.open(f).convert("RGB") for f in sorted((third / "images" / "translated-g1.5").glob("*.png"))]
    assert fid_npz == pytest.approx(compute_fid(again, second / "fid_reference.npz", build_feature_extractor("tiny")),
                                    rel=1e-6)  # the saved stats, against this run's images


def test_evaluate_alignment_only_and_bad_input(eval_setup, tmp_path, capsys):
    job = load_job()
    base = job_overrides(eval_setup, tmp_path / "o", "pipeline=null", "tsne=false")
    assert job.main(base) == 0
    assert "generation" not in json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert not (tmp_path / "o" / "tsne.png").exists()
    for extra, match in [(["translator=/nope"], "model folder not found"),
                         (["guidance_scales=high"], "guidance_scales[0] must be float"),
                         (["languages=fr"], "not found"),
                         (["--compare", "deadbeef"], "no MLflow run")]:
        capsys.readouterr()
        assert job.main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and "Traceback" not in err


def test_default_translator_bootstrap_runs_the_train_job_in_process(tmp_path, monkeypatch):
    """jobs/bootstrap.py trains the default translator through `jobs.train_mtn.main` only when it is missing."""
    from jobs import bootstrap, train_mtn

    default = tmp_path / "local" / "translator"
    monkeypatch.setattr(bootstrap, "DEFAULT_OUTPUT", default.parent)
    monkeypatch.setattr(bootstrap, "DEFAULT_TRANSLATOR", default)
    calls = []

    def fake_main(argv):
        calls.append(argv)
        default.mkdir(parents=True)
        (default / "translator.json").write_text("{}")
        return 0

    monkeypatch.setattr(train_mtn, "main", fake_main)
    other = tmp_path / "elsewhere"
    assert bootstrap.ensure_default_translator(other) == other and calls == []  # not the default: left alone
    assert bootstrap.ensure_default_translator(default) == default
    assert calls == [["--config", str(train_mtn.DEFAULT_CONFIG), f"output_dir={default.parent}"]]
    assert bootstrap.ensure_default_translator(default) == default and len(calls) == 1  # present: not retrained
    (default / "translator.json").unlink()
    default.rmdir()
    monkeypatch.setattr(train_mtn, "main", lambda argv: 2)
    with pytest.raises(MTNError, match=r"default training job failed \(exit 2\)"):
        bootstrap.ensure_default_translator(default)
