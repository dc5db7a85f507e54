"""FLOPs for MFU: one counting rule on every path, checked against analytic formulas (ViT-B/16 sizes)."""
import open_clip
import pytest
import torch

from pretrain.config import LossConfig, ModelConfig
from pretrain.mae import MaskedAutoencoderViT, get_arch, mae_forward_flops
from pretrain.model import UniEmoXPretrainer
from pretrain.teacher import CLIPTeacher, open_clip_flops
from runtime.flops import count_flops, training_step_flops, transformer_flops
from runtime.precision import autocast

from conftest import TINY_CLIP


def test_the_analytic_formulas_give_the_known_vit_b16_figures():
    """MAE ViT-B/16 at mask 0.75: 19.56 GF per forward (58.7 per step); CLIP ViT-B-16: 35.1 GF per image at 224 px,
    6.0 per 77-token text (hand-derived: 24·N·d² + 4·N²·d per block, plus patch embedding and projections)."""
    arch = get_arch("vit_b16")
    assert 3 * mae_forward_flops(arch, 0.75) / 1e9 == pytest.approx(58.69, abs=0.01)
    clip = open_clip_flops("ViT-B-16")
    assert clip["image"] / 1e9 == pytest.approx(35.13, abs=0.01)
    assert clip["text"] / 1e9 == pytest.approx(5.96, abs=0.01)
    assert transformer_flops(50, 768, 1) == 24 * 50 * 768 ** 2 + 4 * 50 ** 2 * 768


def test_open_clip_vit_b16_image_tower_counted_as_analytic():
    """Counted under the rule (MHA fast path off, SDPA's math kernel) in eval mode, no_grad and bf16 autocast, as
    the teacher runs in a step: within 2 % of the formula (without the rule the counter sees 22.5 GF of 35.1)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-16", pretrained=None).eval()
    image, text = torch.randn(1, 3, 224, 224), open_clip.get_tokenizer("ViT-B-16")(["a photo"])
    expected = open_clip_flops("ViT-B-16")
    for context in (None, lambda: autocast("bf16", torch.device("cpu"))):
        counted_image = count_flops(lambda: model.encode_image(image), context)
        counted_text = count_flops(lambda: model.encode_text(text), context)
        assert counted_image == pytest.approx(expected["image"], rel=0.02)
        assert counted_text == pytest.approx(expected["text"], rel=0.02)


def test_mae_vit_b16_step_at_mask_075_counted_as_analytic():
    torch.manual_seed(0)
    mae = MaskedAutoencoderViT(get_arch("vit_b16"))
    images = torch.randn(2, 3, 224, 224)
    for context in (None, lambda: autocast("bf16", torch.device("cpu"))):
        counted = training_step_flops(lambda: mae(images, 0.75), context=context) / 2
        assert counted == pytest.approx(3 * mae_forward_flops(mae.arch, 0.75), rel=0.02)


def test_a_live_teacher_is_counted_once_beside_the_student_counted_three_times():
    """The step with a live teacher = the student's forward 3x (with its backward) + the teacher's own forward 1x,
    in fp32 and under bf16 autocast alike: the student's count is the same with the teacher's embeddings from a
    cache or from the teacher, and none of the frozen work is counted as trained."""
    torch.manual_seed(0)
    teacher = CLIPTeacher(TINY_CLIP, "random")
    student = UniEmoXPretrainer(ModelConfig(preset="tiny"), LossConfig(), teacher.embed_dim)
    batch = {"image": torch.randn(4, 3, 32, 32), "person": torch.randn(4, 3, 32, 32),
             "text": teacher.tokenize(["The overall emotion conveyed is awe."] * 4)}
    batch.update(clip_image=teacher.encode_image(batch["image"]), clip_text=teacher.encode_text(batch["text"]))

    def frozen():
        teacher.encode_image(batch["image"]), teacher.encode_text(batch["text"])
    for precision in ("fp32", "bf16"):
        def context():
            return autocast(precision, torch.device("cpu"))
        with_live = training_step_flops(lambda: student(batch), frozen, context)
        with_cache = training_step_flops(lambda: student(batch), context=context)
        teacher_alone, student_alone = count_flops(frozen, context), count_flops(lambda: student(batch), context)
        assert teacher_alone > 0 and with_cache == 3 * student_alone, precision
        assert with_live == with_cache + teacher_alone, precision
