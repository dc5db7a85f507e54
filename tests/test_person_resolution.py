"""The person branch at its own, smaller resolution (model.person_img_size): one position table resampled, masked
like the scene, and a real run through pretrain/main.py."""
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pretrain.config import LossConfig, ModelConfig
from pretrain.data import PretrainTransform
from pretrain.mae import MaskedAutoencoderViT, get_arch, sincos_pos_embed
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import CLIPTeacher

from conftest import TINY_CLIP, run_torchrun
from pretrain_fixtures import make_pretrain_shards, pretrain_args


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return CLIPTeacher(TINY_CLIP, "random")


def model(teacher, person_img_size):
    torch.manual_seed(0)
    return UniEmoXPretrainer(ModelConfig(preset="tiny", person_img_size=person_img_size), LossConfig(),
                             teacher.embed_dim)


def batch(teacher, n=4, person_side=16):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(n, 3, 32, 32, generator=g)
    return {"image": image, "person": torch.randn(n, 3, person_side, person_side, generator=g),
            "clip_image": teacher.encode_image(image),
            "clip_text": teacher.encode_text(teacher.tokenize(["The overall emotion conveyed is awe."] * n)),
            "noise": torch.rand(n, 16, generator=g), "person_noise": torch.rand(n, 4, generator=g)}


def test_the_position_table_is_resampled_from_the_one_table():
    mae = MaskedAutoencoderViT(get_arch("tiny"))  # 32 px, patch 8: a 4x4 grid
    assert mae.position_embedding(32) is mae.pos_embed
    small = mae.position_embedding(16)  # 2x2 grid
    assert small.shape == (1, 5, 64)
    assert torch.equal(small[:, 0], mae.pos_embed[:, 0])  # the CLS row is kept as is
    # each 2x2 position is the antialiased bicubic mean of its 2x2 block of the 4x4 sin-cos grid (row-major order):
    grid = sincos_pos_embed(64, 4, cls_token=False).reshape(4, 4, 64).permute(2, 0, 1)[None]
    expected = F.interpolate(grid, size=(2, 2), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(small[0, 1:], expected[0].permute(1, 2, 0).reshape(4, 64), atol=1e-5)
    # a 2x2 grid is a coarser view of the same positions: top-left stays nearer top-left than bottom-right
    assert F.cosine_similarity(small[0, 1], mae.pos_embed[0, 1], dim=0) > \
        F.cosine_similarity(small[0, 1], mae.pos_embed[0, 16], dim=0)
    with pytest.raises(ValueError, match="input side 20 is not a multiple of the patch size 8"):
        mae.position_embedding(20)
    with pytest.raises(ValueError, match=r"model.person_img_size=12 is not a multiple of the patch size \(8\)"):
        UniEmoXPretrainer(ModelConfig(preset="tiny", person_img_size=12), LossConfig(), 32)


def test_the_resampled_table_is_made_once_and_follows_a_new_table():
    """A step's person pass no longer resamples the table: the same tensor comes back until the table itself changes
    (a load in place, a cast), and then it is the new table's resampling."""
    mae = MaskedAutoencoderViT(get_arch("tiny"))
    first = mae.position_embedding(16)
    assert mae.position_embedding(16) is first
    mae.load_state_dict({**mae.state_dict(), "pos_embed": mae.pos_embed.detach() * 2})
    reloaded = mae.position_embedding(16)
    assert reloaded is not first and torch.allclose(reloaded, first * 2, atol=1e-5)
    mae.to(torch.bfloat16)
    assert mae.position_embedding(16).dtype == torch.bfloat16


def test_the_person_pass_has_a_quarter_of_the_tokens_and_is_masked_like_the_scene(teacher):
    m = model(teacher, 16)
    seen = []
    m.mae.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    out = m(batch(teacher))
    # scene: CLS + 25 % of 16 patches; person: CLS + 25 % of 4 patches (the same mask ratio)
    assert seen == [(4, 1 + 4, 64), (4, 1 + 1, 64)]
    assert set(out.terms) == {"mae", "paired", "relational"} and out.pred.shape == (4, 16, 192)
    with pytest.raises(ValueError, match=r"the person crop is \(32, 32\) px; model.person_img_size is 16"):
        m({**batch(teacher), "person": torch.zeros(4, 3, 32, 32)})
    again = m(batch(teacher))
    assert torch.equal(out.loss, again.loss)  # the given noises fix both masks
    other = m({**batch(teacher), "person_noise": torch.rand(4, 4, generator=torch.Generator().manual_seed(9))})
    assert not torch.equal(out.terms["paired"], other.terms["paired"])  # the person's mask is its own
    assert torch.equal(out.terms["mae"], other.terms["mae"])           # and leaves the scene's alone
    out.loss.backward()
    assert m.mae.patch_embed.proj.weight.grad.abs().sum() > 0 and all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in m.fusion.parameters())


def test_the_person_crop_at_its_own_size_changes_the_student_and_nothing_else(teacher):
    full, small = model(teacher, None), model(teacher, 16)
    small.load_state_dict(full.state_dict())  # the same weights: person_img_size adds no parameter
    b = batch(teacher)
    b_full = {**b, "person": F.interpolate(b["person"], size=32, mode="bilinear"),
              "noise": torch.cat([b["noise"], torch.rand(4, 16, generator=torch.Generator().manual_seed(2))])}
    a, c = full(b_full), small(b)
    assert torch.equal(a.terms["mae"], c.terms["mae"])  # the scene pass is the same
    assert not torch.equal(a.terms["paired"], c.terms["paired"])


def test_the_transform_makes_the_person_view_at_its_size():
    image = Image.new("RGB", (60, 40), (200, 30, 30))
    sample = {"image": image, "meta": {"person_box": [0.1, 0.1, 0.6, 0.9]}, "__key__": "k"}
    out = PretrainTransform(32, (0.5, 1.0), True, None, cached=False, person_img_size=16)(sample)
    assert out["image"].shape == (3, 32, 32) and out["person"].shape == (3, 16, 16)
    same = PretrainTransform(32, (0.5, 1.0), True, None, cached=False)(sample)
    assert same["person"].shape == (3, 32, 32)


def test_pretraining_runs_with_a_small_person_branch(tmp_path):
    pattern = make_pretrain_shards(tmp_path / "data")
    out = tmp_path / "run"
    run_torchrun(1, *pretrain_args(pattern, out, "model.person_img_size=16", "train.epochs=1"))
    result = json.loads((out / "result.json").read_text())
    window = result["last_window"]  # the model refuses a person crop of any other size, so the loader made 16 px
    assert result["final_step"] == 20 and all(torch.isfinite(torch.tensor(window[f"train/loss_{t}"]))
                                                for t in ("mae", "paired", "relational"))
