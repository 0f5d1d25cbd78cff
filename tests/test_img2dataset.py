"""The finetune's data path end to end: images on a (loopback) web server + a parquet url/caption list ->
`img2dataset --output_format webdataset` -> the shards read by the finetune job's own loader (mtn.finetune.open_data).

img2dataset is installed with --no-deps (its pins want pandas<3, which the stack does not use); pyproject.toml's
`img2dataset` extra lists what it imports for webdataset output."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("img2dataset")

COLORS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 220), "yellow": (240, 230, 20),
          "white": (250, 250, 250), "black": (5, 5, 5), "magenta": (220, 20, 220), "cyan": (20, 220, 220),
          "grey": (128, 128, 128)}


@pytest.fixture
def image_server(tmp_path):
    """A folder of painted images (PNG and JPEG, various sizes) behind a loopback HTTP server; (base URL, rows)."""
    from PIL import Image

    folder = tmp_path / "site"
    folder.mkdir()
    rows = []
    for i, (name, rgb) in enumerate(COLORS.items()):
        file = f"img{i}.{'png' if i % 2 else 'jpg'}"
        Image.new("RGB", (40 + 8 * i, 64 - 2 * i), rgb).save(folder / file)
        rows.append((file, f"a {name} square, picture number {i}"))
    handler = functools.partial(_QuietHandler, directory=str(folder))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", rows
    srv.shutdown()
    srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_img2dataset_shards_feed_the_finetune_loader(tmp_path, image_server):
    import pandas as pd
    import torch

    from mtn.config import load_config
    from mtn.finetune import open_data
    from mtn.finetune_config import FinetuneConfig

    base, rows = image_server
    table = [{"url": f"{base}/{file}", "caption": caption} for file, caption in rows]
    table.insert(4, {"url": f"{base}/missing.jpg", "caption": "a picture that is not there"})  # a dead link
    pd.DataFrame(table).to_parquet(tmp_path / "urls.parquet")
    out = tmp_path / "shards"
    exe = shutil.which("img2dataset", path=str(Path(sys.executable).parent))
    assert exe, "img2dataset's command is not installed in this environment"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}  # albumentations asks PyPI for updates at import otherwise
    cmd = [exe, "--url_list", str(tmp_path / "urls.parquet"), "--input_format", "parquet", "--url_col", "url",
           "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
           "--image_size", "32", "--resize_mode", "keep_ratio", "--encode_format", "jpg",
           "--number_sample_per_shard", "4", "--processes_count", "1", "--thread_count", "2",
           "--enable_wandb", "False", "--timeout", "10"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]  # 10 rows / 4

    cfg = load_config(None, [f"train_shards={out}", f"output_dir={tmp_path / 'ft'}", "resolution=32",
                             "batch_size=3", "num_workers=1", "loader_workers=0", "shuffle_buffer=4",
                             "min_image_size=32"], cls=FinetuneConfig)
    seen = {}
    for batch in open_data(cfg, rank=0, world=1, epoch=0, skip_batches=0):
        assert batch["pixel_values"].shape == (3, 3, 32, 32)  # [B, 3, R, R]
        for caption, pixels in zip(batch["captions"], batch["pixel_values"], strict=True):
            seen[caption] = pixels
    assert sorted(seen) == sorted(caption for _, caption in rows)  # 9 images; the dead link is not a sample
    for caption, pixels in seen.items():  # each image arrives with its own caption: the painted colour matches
        rgb = torch.tensor(COLORS[caption.split()[1]], dtype=torch.float32) / 127.5 - 1
        assert torch.allclose(pixels.mean(dim=(1, 2)), rgb, atol=0.15), caption
