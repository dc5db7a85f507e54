"""Teacher adaptation on real labelled images (Fashion-MNIST): zero-shot top-1 rises well above the unadapted
teacher's, the frozen text tower stays as it was, the saved file is a teacher everywhere one is used, and a run
killed with SIGKILL resumes."""
import io
import json
import subprocess
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_tools.tars import read_tar
from finetune.teacher_adaptation import TEACHER_FILE, BalancedClasses, PromptedTransform
from finetune.zeroshot import TEMPLATE_SETS, evaluate
from pretrain.cache_teacher import main as cache_main
from pretrain.teacher import CLIPTeacher
from runtime.checkpoint import CheckpointStore, load_checkpoint
from runtime.seeding import seed_everything

from conftest import REPO, TINY_CLIP, clean_env, kill_tree, run_torchrun, torchrun_cmd
from image_data import FMNIST, fashion_shards

pytestmark = pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian package dataset-fashion-mnist not installed "
                                                            "(make test installs it)")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return fashion_shards(tmp_path_factory.mktemp("fashion"))


def adapt_args(shards, out, *extra):
    """The tiny random open_clip model as the teacher: 600 training images, batch 32 x 2 ranks (9 steps an epoch)."""
    return ["finetune/adapt_teacher.py", "--dataset", "fashion", "--data", str(shards), f"run.output_dir={out}",
            f"teacher.arch={TINY_CLIP}", "teacher.checkpoint=random", "train.templates=object", "data.batch_size=32",
            "data.num_workers=1", "optim.blr=4e-3", "run.log_every=5", *extra]


@pytest.fixture(scope="module")
def adapted(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("adapt")
    run_torchrun(2, *adapt_args(shards, out, "train.epochs=15", "train.freeze_text=false"))  # random text: train it
    return out


def test_zero_shot_rises_well_above_the_unadapted_teacher(adapted):
    metrics = json.loads((adapted / "metrics.json").read_text())
    before, after = metrics["before"], metrics["after"]
    assert before["val"]["top1"] < 0.25 and before["test"]["top1"] < 0.25  # a random teacher: near chance (0.1)
    assert after["val"]["top1"] > before["val"]["top1"] + 0.3, metrics["history"]
    assert after["test"]["top1"] > before["test"]["top1"] + 0.3 and after["test"]["n"] == 400


def test_the_file_is_a_teacher_for_zero_shot_and_the_teacher_cache(adapted, shards, tmp_path):
    file = str(adapted / TEACHER_FILE)
    teacher = CLIPTeacher(TINY_CLIP, file)  # what teacher.checkpoint=FILE builds
    # finetune.zeroshot scores it exactly as the adaptation's own test evaluation did (2 ranks gathered)
    result = evaluate(None, teacher, "fashion", str(shards), str(tmp_path / "zs"), templates=TEMPLATE_SETS["object"],
                      splits=("test",))
    metrics = json.loads((adapted / "metrics.json").read_text())
    assert result["test"]["top1"] == pytest.approx(metrics["after"]["test"]["top1"], abs=1e-9)
    assert cache_main(["--shards", str(shards / "train" / "00000.tar"), "--teacher-arch", TINY_CLIP,
                       "--teacher-checkpoint", file, "--out", str(tmp_path / "cache"), "--dtype", "float32"]) == 0
    cached, error = read_tar(tmp_path / "cache" / "00000.tar")
    assert not error and cached
    embeddings = np.stack([np.load(io.BytesIO(v["clip_image.npy"])) for v in cached.values()])
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-4) and embeddings.std(0).mean() > 1e-3
    # and as the live teacher of a pretraining run
    pretrain_out = tmp_path / "pretrain"
    run_torchrun(1, "pretrain/main.py", "--config", "configs/pretrain/tiny.yaml",
                 f"data.train=[{shards}/train/{{00000..00005}}.tar]", f"run.output_dir={pretrain_out}",
                 f"teacher.arch={TINY_CLIP}", f"teacher.checkpoint={file}", "data.batch_size=16", "train.epochs=1",
                 "data.num_workers=1", "train.image_every=0")
    stored = load_checkpoint(pretrain_out)["config"]["teacher"]
    assert stored["checkpoint"] == file and json.loads((pretrain_out / "result.json").read_text())["final_step"] > 0


def test_a_killed_run_resumes_and_finishes(shards, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen(torchrun_cmd(2, *adapt_args(shards, out, "train.epochs=3", "run.ckpt_every=3",
                                                        "debug.step_sleep_s=0.3")),
                            cwd=REPO, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    store, deadline = CheckpointStore(out / "checkpoints"), time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        latest = store.latest()
        if latest is not None and load_checkpoint(latest)["step"] >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    kill_tree(proc.pid)
    killed = load_checkpoint(out)
    assert 3 <= killed["step"] < 27 and "before" in killed["extra"]
    done = run_torchrun(2, *adapt_args(shards, out, "train.epochs=3", "run.ckpt_every=3"))
    assert "resumed from" in done.stdout + done.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_step"] == 27 and metrics["before"] == killed["extra"]["before"]  # measured once, kept
    # train.freeze_text (the default) kept the text tower as it started; the image tower learned
    seed_everything(0)  # run.seed: the random teacher the run started from
    start = CLIPTeacher(TINY_CLIP, "random").model.state_dict()
    adapted_state = load_file(str(out / TEACHER_FILE))
    assert set(adapted_state) == set(start)
    text = [k for k in start if k.startswith(("transformer.", "token_embedding", "ln_final", "text_projection"))]
    image = [k for k in start if k.startswith("visual.")]
    assert text and image
    assert all(torch.equal(adapted_state[k], start[k]) for k in text)
    assert all(not torch.equal(adapted_state[k], start[k]) for k in image)


def test_balanced_draws_equalise_the_classes():
    torch.manual_seed(0)
    balance = BalancedClasses([300, 100, 50, 0])
    kept = [sum(balance(c) for _ in range(n)) for c, n in ((0, 3000), (1, 1000), (2, 500))]
    assert kept[2] == 500 and abs(kept[0] - 500) < 60 and abs(kept[1] - 500) < 60
    assert balance.keep[3] == 0.0


def test_a_multi_label_record_pairs_the_image_with_one_of_its_labels():
    transform = PromptedTransform(lambda image: image, num_classes=4, balance=None)
    sample = {"image": "img", "__key__": "k", "meta": {"label": 0, "labels": [0, 1, 0, 1]}}
    drawn = {transform(sample)["label"] for _ in range(50)}
    assert drawn == {1, 3}
    assert transform({**sample, "meta": {"label": 2}})["label"] == 2
    with pytest.raises(ValueError, match="label 7 is not a class index"):
        transform({**sample, "meta": {"label": 7}})
    skip_all = PromptedTransform(lambda image: image, 4, BalancedClasses([0, 0, 10, 5]))
    assert skip_all({**sample, "meta": {"label": 0}}) is None  # a class with no training samples is never drawn
