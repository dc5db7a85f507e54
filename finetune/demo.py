"""`python -m finetune.demo --out OUT [--src DIR]`: the whole system on one labelled image folder, with the
numbers that say whether pretraining helped. `make demo` runs it.

DIR is an ImageFolder tree with train/, val/ and test/ sub-trees (class folders inside); without --src, 5,000
Fashion-MNIST training images and 6,000 of its test images (1,000 for val, 5,000 for test; Debian's
dataset-fashion-mnist) are exported into one.
The budget is in images seen, not epochs (PRETRAIN_IMAGES, FINETUNE_IMAGES), so the demo takes about as long on
any folder: the epochs are the budget over the training split's size.
Every step is one of the commands a user types, printed before it runs:

  shards          data_tools shard-folder + verify
  logreg_pixels   logistic regression on the raw pixels (finetune.baseline): the floor
  teacher cache   the offline teacher (ImageNet classifier + sentence encoder) embeds each training image once
  mae_only        pretraining with the distillation weights at 0 (MAE alone), then fine-tuning
  distilled       pretraining with MAE + paired + relational distillation from the teacher, then fine-tuning
  scratch         fine-tuning a randomly initialised encoder with the same recipe and budget
  distilled_linear_probe   a linear head on the frozen distilled encoder
  zeroshot_teacher / zeroshot_student   top-1 of prompts built from the class names, through the teacher's
                  image embedding and through the distilled student's

It prints the table and writes OUT/results.json: {"runs": [{"name", "test_top1", "val_top1", ...}], "seconds"}.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from finetune.report import markdown, result_rows
from runtime.atomic import atomic_write_text
from runtime.cli import HelpFormatter

REPO = Path(__file__).resolve().parent.parent
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
PRETRAIN_CONFIG = "configs/pretrain/demo.yaml"
FINETUNE_CONFIG = "configs/finetune/demo.yaml"
DATASET = "demo"  # the name the shards are written under
IMG_SIZE = 28     # the demo encoder's input side (the tiny_p4 preset): the pixel baseline sees the same pixels
FASHION_PER_CLASS = {"train": 500, "val": 100, "test": 500}
PRETRAIN_IMAGES = 120_000  # images seen by each pretraining: 24 epochs of 5,000 (40 of 3,000)
FINETUNE_IMAGES = 75_000   # by each fine-tuning, the same for scratch and pretrained: 15 epochs of 5,000 (25 of 3,000)


class Demo:
    """Runs the steps as subprocesses from the repository root; a failing step stops the demo with its command."""

    def __init__(self, out: Path, nproc: int, seed: int, pretrain_epochs: Optional[float],
                 finetune_epochs: Optional[int]):
        self.out, self.nproc = out, nproc
        self.seed, self.pretrain_epochs, self.finetune_epochs = seed, pretrain_epochs, finetune_epochs
        self.timings: List[dict] = []

    def run(self, title: str, args: Sequence[str]) -> None:
        cmd = [str(a) for a in args]
        print(f"\n== {title}\n$ {shlex.join(cmd)}", flush=True)
        start = time.time()
        done = subprocess.run(cmd, cwd=REPO)
        self.timings.append({"step": title, "seconds": round(time.time() - start, 1)})
        if done.returncode != 0:
            raise SystemExit(f"demo step '{title}' failed (exit {done.returncode}): {shlex.join(cmd)}")

    def python(self, title: str, *args) -> None:
        self.run(title, [sys.executable, *args])

    def torchrun(self, title: str, script: str, *args) -> None:
        self.python(title, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", self.nproc, script,
                    *args)

    def fashion_mnist(self, folder: Path) -> None:
        if not FASHION_MNIST.is_dir():
            raise SystemExit(f"{FASHION_MNIST} not found: install Debian's dataset-fashion-mnist (make demo does), "
                             f"or give --src DIR")
        train = [FASHION_MNIST / "train-images-idx3-ubyte.gz", FASHION_MNIST / "train-labels-idx1-ubyte.gz"]
        test = [FASHION_MNIST / "t10k-images-idx3-ubyte.gz", FASHION_MNIST / "t10k-labels-idx1-ubyte.gz"]
        for split, files, skip in (("train", train, 0), ("val", test, 0), ("test", test, FASHION_PER_CLASS["val"])):
            self.python(f"Fashion-MNIST -> {split} folder", "-m", "data_tools", "idx-to-folder", *files, "--out",
                        folder / split, "--per-class", FASHION_PER_CLASS[split], "--skip-per-class", skip)

    def budgets(self, shards: Path) -> Tuple[List[str], List[str]]:
        """(pretraining, fine-tuning) overrides: the seed, and the epochs that hold the image budgets (or those
        given on the command line)."""
        train_images = json.loads((shards / "info.json").read_text())["splits"]["train"]["samples"]
        pretrain_epochs = self.pretrain_epochs or round(PRETRAIN_IMAGES / train_images, 2)
        finetune_epochs = self.finetune_epochs or max(1, round(FINETUNE_IMAGES / train_images))
        print(f"\n== budget: {train_images} training images; pretraining {pretrain_epochs} epochs, fine-tuning "
              f"{finetune_epochs} epochs", flush=True)
        return ([f"run.seed={self.seed}", f"train.epochs={pretrain_epochs}"],
                [f"run.seed={self.seed}", f"train.epochs={finetune_epochs}"])

    def pipeline(self, src: Optional[str]) -> None:
        out = self.out
        folder = Path(src) if src else out / "fashion_src"
        if src is None:
            self.fashion_mnist(folder)
        missing = [s for s in ("train", "val", "test") if not (folder / s).is_dir()]
        if missing:
            raise SystemExit(f"{folder}: needs train/, val/ and test/ sub-folders (class folders inside); "
                             f"missing {', '.join(missing)}")
        shards = out / "shards"
        self.python("shards", "-m", "data_tools", "shard-folder", DATASET, folder, "--generic", "--out", shards,
                    "--shard-size", 250, "--min-shards", 4, "--max-side", 128)
        self.python("verify shards", "-m", "data_tools", "verify", shards)
        pretrain_overrides, finetune_overrides = self.budgets(shards)
        count = len(list((shards / "train").glob("*.tar")))  # shard-folder numbers them 00000, 00001, ...
        train = str(shards / "train" / f"{{00000..{count - 1:05d}}}.tar")
        data = ["--dataset", DATASET, "--data", shards]
        self.python("logreg_pixels", "-m", "finetune.baseline", *data, "--img-size", IMG_SIZE, "--out",
                    out / "logreg_pixels")
        self.python("teacher cache", "-m", "pretrain.cache_teacher", "--shards", train, "--teacher-config",
                    PRETRAIN_CONFIG, "--out", out / "teacher_cache")
        pretrain = ["--config", PRETRAIN_CONFIG, f"data.train=[{train}]", f"teacher.cache={out / 'teacher_cache'}",
                    *pretrain_overrides]
        self.torchrun("pretrain mae_only", "pretrain/main.py", *pretrain, f"run.output_dir={out / 'pretrain_mae_only'}",
                      "loss.paired=0", "loss.relational=0")
        self.torchrun("pretrain distilled", "pretrain/main.py", *pretrain,
                      f"run.output_dir={out / 'pretrain_distilled'}")
        finetune = ["--config", FINETUNE_CONFIG, *data, *finetune_overrides]
        # layer decay protects pretrained lower layers; a random encoder has none to protect (MAE's from-scratch
        # baselines train without it), so scratch gets the same recipe and budget with layer_decay=1
        self.torchrun("fine-tune scratch", "finetune/main.py", *finetune, "--from-scratch", "train.layer_decay=1.0",
                      f"run.output_dir={out / 'scratch'}")
        for name in ("mae_only", "distilled"):
            self.torchrun(f"fine-tune {name}", "finetune/main.py", *finetune, "--checkpoint",
                          out / f"pretrain_{name}", f"run.output_dir={out / name}")
        self.torchrun("linear probe distilled", "finetune/main.py", *finetune,
                      "--linear-probe", "--checkpoint", out / "pretrain_distilled",
                      f"run.output_dir={out / 'distilled_linear_probe'}")
        zeroshot = ["-m", "finetune.zeroshot", "--checkpoint", out / "pretrain_distilled", *data, "--templates",
                    "object", "--crop-pct", "1.0", "--splits", "val", "test"]
        self.python("zeroshot_teacher", *zeroshot, "--teacher-only", "--out", out / "zeroshot_teacher")
        self.python("zeroshot_student", *zeroshot, "--out", out / "zeroshot_student")


RUNS = ("logreg_pixels", "scratch", "mae_only", "distilled", "distilled_linear_probe", "zeroshot_teacher",
        "zeroshot_student")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (replaced)")
    parser.add_argument("--src", help="ImageFolder tree with train/ val/ test/ (default: Fashion-MNIST)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per training run (torchrun)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed of every training run (the data is fixed)")
    parser.add_argument("--pretrain-epochs", type=float,
                        help=f"pretraining epochs (default: {PRETRAIN_IMAGES} images over the training split's size)")
    parser.add_argument("--finetune-epochs", type=int,
                        help=f"fine-tuning epochs (default: {FINETUNE_IMAGES} images over the training split's size)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty: give a new --out (make demo clears DEMO_DIR first)")
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    demo = Demo(out, args.nproc, args.seed, args.pretrain_epochs, args.finetune_epochs)
    demo.pipeline(str(Path(args.src).resolve()) if args.src else None)
    rows = result_rows([str(out / name) for name in RUNS], list(RUNS))
    seconds = round(time.time() - start, 1)
    result = {"runs": rows, "seconds": seconds, "source": args.src or "Fashion-MNIST (Debian)", "seed": args.seed,
              "steps": demo.timings}
    atomic_write_text(out / "results.json", json.dumps(result, indent=1) + "\n")
    table = markdown(rows)
    atomic_write_text(out / "results.md", table + "\n")
    print(f"\n== results ({seconds:.0f} s; {out / 'results.json'})\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
