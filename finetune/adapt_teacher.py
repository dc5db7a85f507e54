"""Teacher adaptation: contrastive fine-tuning of an open_clip teacher on labelled shards with emotion prompts,
before it is distilled (stage 1 of adapt teacher -> pretrain with it -> fine-tune).

    torchrun --nproc_per_node 2 -m finetune.adapt_teacher --dataset FI --data shards/FI \
        teacher.arch=ViT-B-16 teacher.checkpoint=path/to/clip_b16.bin run.output_dir=runs/teacher_fi
    # then: pretrain/main.py ... teacher.checkpoint=runs/teacher_fi/teacher.safetensors

Each image is paired with its class's prompt ("a photo that conveys {emotion}.", a template drawn at random per
sample; for a multi-label record, one of its labels) and trained with open_clip's ClipLoss, on class-balanced
draws. Zero-shot top-1 on val (the templates averaged per class, as finetune.zeroshot scores a teacher) is measured
before training and after every epoch; the best epoch's weights are written as `teacher.safetensors`, an open_clip
state dict that `teacher.checkpoint=` loads unchanged, and its zero-shot test metrics to metrics.json.
"""
import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_tools.registry import UnknownDatasetError  # noqa: E402
from finetune.config import AdaptConfig  # noqa: E402
from runtime.checkpoint import CheckpointError  # noqa: E402
from runtime.cli import shortcut_flags  # noqa: E402
from runtime.device import DeviceError  # noqa: E402
from runtime.guard import NonFiniteLossError, StopRequest  # noqa: E402
from runtime.entry import init_distributed_for, run_job  # noqa: E402

log = logging.getLogger("finetune.adapt_teacher")


def adapt(cfg: AdaptConfig, stop: StopRequest) -> int:
    from finetune.data import patch_timm_posterize
    from finetune.teacher_adaptation import TeacherAdaptation
    patch_timm_posterize()
    env = init_distributed_for("ddp", cfg.run.dist_timeout_s, cfg.run.device, cfg.train.precision)
    TeacherAdaptation(cfg, env, stop).run()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="finetune/adapt_teacher.py", description=__doc__)
    shortcuts = shortcut_flags(parser, {"--dataset": "data.dataset", "--data": "data.root"})
    return run_job(AdaptConfig, argv, __doc__, log, adapt,
                   expected=(UnknownDatasetError, CheckpointError, NonFiniteLossError, FileNotFoundError, ValueError,
                             DeviceError), parser=parser, shortcuts=shortcuts)

if __name__ == "__main__":
    from runtime.entry import run_as_script
    run_as_script(main, "teacher adaptation")
