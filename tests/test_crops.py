"""Crops decoded at JPEG draft scale: the factor rule, the same crops and pixels as torchvision's RandomResizedCrop,
uint8 views normalised once per batch as ToTensor + Normalize would."""
import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision import transforms
from torchvision.transforms import functional as TF

from data_tools.crops import DraftResizedCrops, draft_factor, person_region
from data_tools.images import ImageError, load_rgb
from pretrain.data import normalize_views
from data_tools.images import IMAGENET_MEAN, IMAGENET_STD


@pytest.fixture(scope="module")
def photo_jpeg():
    """A real 640x427 photo as JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(load_sample_images().images[0]).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_the_factor_keeps_every_crop_at_its_output_side():
    assert draft_factor([(0, 0, 230, 300)], [28]) == 8      # 230 px hold 8 x 28
    assert draft_factor([(0, 0, 230, 300)], [224]) == 1     # 230 px cannot shrink for 224
    assert draft_factor([(0, 0, 500, 480)], [224]) == 2
    assert draft_factor([(0, 0, 500, 480), (10, 10, 120, 200)], [224, 28]) == 2  # the tightest view decides
    assert draft_factor([(0, 0, 500, 480), (10, 10, 60, 200)], [224, 28]) == 1
    assert person_region((200, 100), [0.1, 0.2, 0.6, 0.9]) == (20, 20, 120, 90)
    assert person_region((200, 100), None) is None and person_region((200, 100), [0.5, 0.5, 0.505, 0.9]) is None
    with pytest.raises(ValueError, match="not four numbers"):
        person_region((200, 100), [0.1, 0.2])


def test_small_views_decode_a_jpeg_at_a_fraction_of_its_size(photo_jpeg):
    full = load_rgb(Image.open(io.BytesIO(photo_jpeg)))
    image = Image.open(io.BytesIO(photo_jpeg))
    torch.manual_seed(0)
    views = DraftResizedCrops((0.9, 1.0))(image, [(None, 32)])
    assert image.size == (80, 54)  # decoded at 1/8: every 0.9-1.0 crop of 640x427 holds 8 x 32 px
    assert views[0].dtype == torch.uint8 and views[0].shape == (3, 32, 32)
    # the same crop drawn from the full decode looks the same (the draft costs no visible detail at 32 px)
    torch.manual_seed(0)
    reference = DraftResizedCrops((0.9, 1.0))(full, [(None, 32)])[0]
    assert (views[0].float() - reference.float()).abs().mean() < 4.0
    big = Image.open(io.BytesIO(photo_jpeg))
    DraftResizedCrops((0.2, 1.0))(big, [(None, 224)])
    assert big.size == (640, 427)  # a 224 px view of a 640 px photo: full decode


def test_crops_match_torchvision_random_resized_crop(photo_jpeg):
    image = load_rgb(Image.open(io.BytesIO(photo_jpeg)))
    scale, ratio = (0.2, 1.0), (3 / 4, 4 / 3)
    for seed in range(5):
        torch.manual_seed(seed)
        ours = DraftResizedCrops(scale, ratio, flip=0.0)(image, [(None, 96)])[0]
        torch.manual_seed(seed)
        i, j, h, w = transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
        theirs = TF.pil_to_tensor(TF.resized_crop(image, i, j, h, w, [96, 96],
                                                  transforms.InterpolationMode.BICUBIC))
        # same box; PIL's resize with a box filters across the box edge, a crop first does not: edges differ a little
        assert (ours.float() - theirs.float()).abs().mean() < 1.5, seed
    torch.manual_seed(0)
    flipped = DraftResizedCrops((1.0, 1.0), (1.0, 1.0), flip=1.0)(image, [(None, 64)])[0]
    torch.manual_seed(0)
    plain = DraftResizedCrops((1.0, 1.0), (1.0, 1.0), flip=0.0)(image, [(None, 64)])[0]
    assert torch.equal(flipped, plain.flip(-1))


def test_a_person_view_is_cropped_from_its_region(photo_jpeg):
    image = load_rgb(Image.open(io.BytesIO(photo_jpeg)))
    torch.manual_seed(0)
    crops = DraftResizedCrops((1.0, 1.0), (1.0, 1.0), flip=0.0)
    scene, person = crops(image, [(None, 32), ((100, 50, 300, 250), 16)])
    expected = TF.pil_to_tensor(image.crop((100, 50, 300, 250)).resize((16, 16), Image.BICUBIC))
    assert person.shape == (3, 16, 16) and (person.float() - expected.float()).abs().mean() < 2.0


def test_broken_jpeg_data_are_an_image_error(photo_jpeg):
    cut = Image.open(io.BytesIO(photo_jpeg[:2000]))  # the header is whole, the scan is not
    with pytest.raises(ImageError, match="decode_error"):
        DraftResizedCrops((0.2, 1.0))(cut, [(None, 32)])


def test_uint8_views_normalise_as_to_tensor_and_normalize():
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (4, 3, 8, 8), generator=g, dtype=torch.uint8)
    out = normalize_views({"image": views, "person": views[:, :, :4, :4], "clip_image": torch.ones(4, 2)})
    expected = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(views.float() / 255)
    assert out["image"].dtype == torch.float32 and torch.allclose(out["image"], expected, atol=1e-5)
    assert torch.allclose(out["person"], expected[:, :, :4, :4], atol=1e-5)
    assert torch.equal(out["clip_image"], torch.ones(4, 2))
    assert normalize_views({"image": views}, torch.bfloat16)["image"].dtype == torch.bfloat16
    assert np.isclose(normalize_views({"image": torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)})["image"][0, 0, 0, 0],
                      (1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], atol=1e-6)
