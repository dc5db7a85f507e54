"""Random resized crops of one image decoded once, at the smallest JPEG draft scale that keeps every crop sharp."""
from typing import List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.functional import pil_to_tensor

from data_tools.images import load_rgb

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
DRAFT_FACTORS = (8, 4, 2)        # the scales libjpeg decodes at directly (1/8, 1/4, 1/2)


def person_region(size: Tuple[int, int], box: Optional[Sequence[float]]) -> Optional[Box]:
    """A stored person box (fractions of width/height) in pixels of an image of `size`; None (the whole image) when
    there is no box or it is under 2 px wide or high."""
    if not box:
        return None
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        raise ValueError(f"person_box {box!r} is not four numbers")
    w, h = size
    x0, y0, x1, y1 = (int(round(v)) for v in (box[0] * w, box[1] * h, box[2] * w, box[3] * h))
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return x0, y0, x1, y1


def draft_factor(crops: Sequence[Box], sides: Sequence[int]) -> int:
    """The largest of 8, 4, 2 by which the image may shrink while each crop keeps at least its output side in
    pixels (1: decode at full size)."""
    room = min(min(x1 - x0, y1 - y0) / side for (x0, y0, x1, y1), side in zip(crops, sides))
    return next((f for f in DRAFT_FACTORS if f <= room), 1)


class DraftResizedCrops:
    """torchvision's RandomResizedCrop (same parameters, bicubic) + horizontal flip, one view per (region, side),
    returned as uint8 CHW tensors (normalised later, once per batch). The crop boxes are drawn on the header's size
    before anything is decoded; a JPEG is then decoded at 1/2, 1/4 or 1/8 scale when every box still holds at
    least its output side in pixels, so no view is upsampled more than at full decode. Other formats decode fully."""

    def __init__(self, scale: Tuple[float, float], ratio: Tuple[float, float] = (3 / 4, 4 / 3), flip: float = 0.5):
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip

    def crop(self, size: Tuple[int, int], region: Optional[Box]) -> Box:
        x0, y0, x1, y1 = region or (0, 0, *size)
        # get_params reads only the shape: an empty tensor of the region's height and width
        i, j, h, w = RandomResizedCrop.get_params(torch.empty(0, y1 - y0, x1 - x0), list(self.scale),
                                                  list(self.ratio))
        return x0 + j, y0 + i, x0 + j + w, y0 + i + h

    def __call__(self, image: Image.Image, views: Sequence[Tuple[Optional[Box], int]]) -> List[torch.Tensor]:
        """image: opened, not yet decoded (a decoded one works too, without the saving); views: (region or None
        for the whole image, output side) each."""
        full = image.size
        crops = [self.crop(full, region) for region, _ in views]
        factor = draft_factor(crops, [side for _, side in views])
        decoded = load_rgb(image, (full[0] // factor, full[1] // factor) if factor > 1 else None)
        sx, sy = decoded.width / full[0], decoded.height / full[1]
        out = []
        for (x0, y0, x1, y1), (_, side) in zip(crops, views):
            view = decoded.resize((side, side), Image.BICUBIC, box=(x0 * sx, y0 * sy, x1 * sx, y1 * sy))
            if torch.rand(1).item() < self.flip:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(pil_to_tensor(view))
        return out
