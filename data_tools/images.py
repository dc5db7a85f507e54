"""Decode, validate and re-encode one image: pixel cap, alpha and CMYK to RGB, max side, JPEG quality."""
import io
import warnings
from typing import Optional, Tuple

from PIL import Image, ImageOps, UnidentifiedImageError

# what every model here reads (the student, fine-tuning, exports): a teacher converts to its own normalisation
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_MAX_PIXELS = 60_000_000   # above this an image is refused before decoding (decompression bombs)


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a short code counted in shard stats."""

    def __init__(self, reason: str, message: str):
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def read_file(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError("unreadable_file", f"{path}: {e.strerror or e}") from None


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> RGB PIL image (EXIF orientation applied, transparency composited on white)."""
    if not data:
        raise ImageError("empty", "0-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # header only: nothing decoded yet
            if width * height > max_pixels:
                raise ImageError("too_many_pixels", f"{width}x{height} exceeds the cap of {max_pixels} pixels")
            img.load()
    except ImageError:
        raise
    except UnidentifiedImageError:
        head = data[:64].lstrip().lower()
        kind = "html" if head.startswith((b"<!doctype", b"<html")) else "unknown format"
        raise ImageError("not_an_image", f"not a decodable image ({kind})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise ImageError("too_many_pixels", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None
    img = ImageOps.exif_transpose(img)
    return to_rgb(img)


def load_rgb(img: Image.Image, draft_size: Optional[Tuple[int, int]] = None) -> Image.Image:
    """Decode an opened image to RGB; with draft_size, a JPEG decodes at the smallest libjpeg scale (1/2, 1/4,
    1/8) still at least that large. Broken data: ImageError('decode_error')."""
    try:
        if draft_size:
            img.draft("RGB", draft_size)
        img.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError("decode_error", f"{type(e).__name__}: {e}") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")  # L, I;16, CMYK (PIL undoes Adobe's inverted CMYK), YCbCr, ...


def resize_max_side(img: Image.Image, max_side: int) -> Image.Image:
    width, height = img.size
    if max_side <= 0 or max(width, height) <= max_side:
        return img
    scale = max_side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return img.resize(size, Image.BICUBIC, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False)
    return buf.getvalue()


def reencode(data: bytes, max_side: int = 512, quality: int = 90,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[bytes, Image.Image]:
    """Validated, resized RGB JPEG bytes, and the image they encode (for detection)."""
    img = resize_max_side(decode_image(data, max_pixels), max_side)
    return encode_jpeg(img, quality), img
