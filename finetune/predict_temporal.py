"""Per-frame valence/arousal of new videos or frame folders from a temporal run (`finetune.predict --checkpoint
RUN VIDEO_OR_FOLDER ...` when RUN is a temporal run): rows of (input, frame, time, valence, arousal) on [-1, 1]
and one curve PNG per input; frames are predicted from stitched windows as the run evaluated them."""
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from data_tools.images import load_rgb
from data_tools.splits import IMAGE_EXTENSIONS
from data_tools.video import VIDEO_SUFFIXES, cropped_frames, open_video
from finetune.analysis import figure_png, pyplot
from finetune.cache_frames import frame_view
from finetune.temporal_model import assemble_clip_model, load_trainable_state, stitched_frames
from runtime.atomic import atomic_write_bytes
from runtime.checkpoint import CheckpointError
from runtime.seeding import seed_everything

log = logging.getLogger("finetune.predict")
BEST = "best.safetensors"


def is_temporal_run(checkpoint: str) -> bool:
    config = Path(checkpoint) / "config.yaml"
    return config.is_file() and "temporal" in (yaml.safe_load(config.read_text()) or {})


class TemporalPredictor:
    """A temporal run's model rebuilt from its config.yaml (the encoder as the run built it) with its best weights."""

    def __init__(self, run_dir: str):
        from finetune.temporal_config import TemporalConfig
        from runtime.config import load_config
        run = Path(run_dir)
        if not (run / BEST).is_file():
            raise CheckpointError(f"{run} has no {BEST}: is the temporal run finished (stage 2)?")
        self.cfg = cfg = load_config(TemporalConfig, str(run / "config.yaml"), [])
        if cfg.train.stage != 2:
            raise CheckpointError(f"{run} is a stage-1 run (contrastive, no head): predict with a stage-2 run")
        seed_everything(cfg.run.seed)  # a scratch encoder's weights are those of the run
        self.model, encoder, _, _ = assemble_clip_model(cfg, with_head=True, cached=False)
        load_trainable_state(self.model, load_file(str(run / BEST)), str(run / BEST))
        self.model.eval()
        self.view = frame_view(int(encoder.patch_embed.img_size[0]))
        self.window, self.stride = cfg.data.window, cfg.data.eval_stride

    @torch.no_grad()
    def __call__(self, frames: Sequence[Image.Image]) -> np.ndarray:
        x = torch.stack([self.view(load_rgb(f)) for f in frames])
        return stitched_frames(self.model, x, self.window, self.stride)[0].numpy()


def input_frames(item: str, detector=None, every: int = 1) -> Tuple[List[Image.Image], List[Dict[str, Any]]]:
    """(frames, their {'frame', 'time'}) of a video (decoded, cropped per frame with `detector`) or of a frame
    folder (its images in name order)."""
    path = Path(item)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise FileNotFoundError(f"{path}: no frames ({', '.join(IMAGE_EXTENSIONS)})")
        return [Image.open(f) for f in files], [{"frame": i, "time": None, "file": f.name} for i, f in
                                                 enumerate(files)]
    if path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
        raise FileNotFoundError(f"{path}: not a video ({', '.join(VIDEO_SUFFIXES)}) or a folder of frames")
    _, fps, decoded = open_video(path)
    items = list(cropped_frames(decoded, detector, every))
    return [i["image"] for i in items], [{"frame": i["frame"], "time": i["time"] if i["time"] is not None else
                                          i["frame"] / fps, "box_from": i["box_from"]} for i in items]


def curve_png(name: str, meta: List[Dict[str, Any]], values: np.ndarray) -> bytes:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=80)
    times = [m["time"] for m in meta]
    x, label = (times, "time (s)") if all(t is not None for t in times) else ([m["frame"] for m in meta], "frame")
    ax.plot(x, values[:, 0], label="valence")
    ax.plot(x, values[:, 1], label="arousal")
    ax.axhline(0, c="0.7", lw=0.6)
    ax.set(ylim=(-1.05, 1.05), xlabel=label, title=f"{name}: predicted valence and arousal")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return figure_png(fig)


def predict_temporal(run_dir: str, items: Sequence[str], plot_dir: Optional[str], detect: str = "none",
                     every: int = 1) -> List[Dict[str, Any]]:
    """One row per frame of each input; a curve per input into `plot_dir` (<input name>.png)."""
    from data_tools.detect import make_detector
    predictor, detector = TemporalPredictor(run_dir), make_detector(detect)
    rows: List[Dict[str, Any]] = []
    for item in items:
        frames, meta = input_frames(item, detector, every)
        values = predictor(frames)
        name = Path(item).stem if Path(item).is_file() else Path(item).name
        rows += [{"input": item, **m, "valence": float(v), "arousal": float(a)} for m, (v, a) in zip(meta, values)]
        if plot_dir:
            atomic_write_bytes(Path(plot_dir) / f"{name}.png", curve_png(name, meta, values))
        log.info("%s: %d frames, mean valence %.3f, arousal %.3f", item, len(frames), values[:, 0].mean(),
                 values[:, 1].mean())
    return rows
