"""The images of style transfer: a path, an http(s) URL or skimage:NAME, public-domain paintings by URL (with
offline stand-ins), decoding with errors that name the input, RGB conversion, and an aspect-kept resize that VGG19
can pool."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torchvision.transforms.functional import pil_to_tensor

from ..downloads import TIMEOUT_S, fetch_bytes, fetch_first

MIN_SIDE = 32  # conv5_1 sees the image after 4 poolings (1/16): 32 px leaves it 2 x 2 positions
SKIMAGE_PREFIX = "skimage:"  # "skimage:chelsea" = skimage.data.chelsea(), shipped with scikit-image (Colab has it)
COMMONS = "https://upload.wikimedia.org/wikipedia/commons/"


@dataclass(frozen=True)
class Painting:
    """A public-domain painting on Wikimedia Commons: what it is and the address of the file."""

    title: str
    artist: str
    year: str
    url: str
    page: str

    @property
    def sources(self) -> tuple[str, str]:
        """Where to download it: the file itself, then Wikimedia's own 960 px copy of it (a second server path)."""
        return self.url, commons_thumbnail(self.url, 960)


def commons_thumbnail(url: str, width: int) -> str:
    """The address of Wikimedia's `width`-px thumbnail of a Commons file, from the file's (or a thumbnail's) address:
    .../commons/a/ab/NAME becomes .../commons/thumb/a/ab/NAME/<width>px-NAME (Wikimedia serves standard widths)."""
    if not url.startswith(COMMONS):
        raise ValueError(f"'{url}' is not a Wikimedia Commons file address (it must start with {COMMONS})")
    parts = url[len(COMMONS):].split("/")
    if parts[0] == "thumb":
        parts = parts[1:4]
    a, ab, name = parts[:3]
    return f"{COMMONS}thumb/{a}/{ab}/{name}/{width}px-{name}"


PAINTINGS = {
    "starry_night": Painting(
        "The Starry Night", "Vincent van Gogh", "1889",
        "https://upload.wikimedia.org/wikipedia/commons/thumb/e/ea/Van_Gogh_-_Starry_Night_-_Google_Art_Project.jpg/"
        "1280px-Van_Gogh_-_Starry_Night_-_Google_Art_Project.jpg",
        "https://commons.wikimedia.org/wiki/File:Van_Gogh_-_Starry_Night_-_Google_Art_Project.jpg"),
    "great_wave": Painting(
        "The Great Wave off Kanagawa", "Katsushika Hokusai", "c. 1831",
        "https://upload.wikimedia.org/wikipedia/commons/0/0a/The_Great_Wave_off_Kanagawa.jpg",
        "https://commons.wikimedia.org/wiki/File:The_Great_Wave_off_Kanagawa.jpg"),
    "composition_vii": Painting(
        "Composition VII", "Wassily Kandinsky", "1913",
        "https://upload.wikimedia.org/wikipedia/commons/b/b4/Vassily_Kandinsky%2C_1913_-_Composition_7.jpg",
        "https://commons.wikimedia.org/wiki/File:Vassily_Kandinsky,_1913_-_Composition_7.jpg"),
    "the_scream": Painting(
        "The Scream", "Edvard Munch", "1893",
        "https://upload.wikimedia.org/wikipedia/commons/c/c5/Edvard_Munch%2C_1893%2C_The_Scream%2C_oil%2C_tempera_and_"
        "pastel_on_cardboard%2C_91_x_73_cm%2C_National_Gallery_of_Norway.jpg",
        "https://commons.wikimedia.org/wiki/File:Edvard_Munch,_1893,_The_Scream,_oil,_tempera_and_pastel_on_cardboard,"
        "_91_x_73_cm,_National_Gallery_of_Norway.jpg"),
}
# Offline stand-ins for the paintings (smoke mode downloads nothing): textured images from skimage.data.
PAINTING_STAND_INS = {"starry_night": "skimage:immunohistochemistry", "great_wave": "skimage:coffee",
                      "composition_vii": "skimage:rocket", "the_scream": "skimage:astronaut"}


def is_url(source: str | os.PathLike) -> bool:
    """True for http(s) addresses."""
    return str(source).lower().startswith(("http://", "https://"))


def fetch_url(url: str, role: str = "image", timeout: float = TIMEOUT_S) -> bytes:
    """Download `url` through helpers.downloads (a timeout, the project's User-Agent, which Wikimedia requires);
    a failure raises DownloadError (a ConnectionError) saying which input it was and what to do."""
    return fetch_bytes(url, role, timeout)


def fetch_painting(key: str, folder: str | os.PathLike, timeout: float = TIMEOUT_S) -> Path:
    """The painting PAINTINGS[key] as a file in `folder` (e.g. DATA_DIR/paintings): reused when a readable copy is
    there, else downloaded from its first source that answers (the file, then Wikimedia's 960 px copy). Raises
    DownloadError listing every source, and what to do, when none answers."""
    painting = PAINTINGS[key]
    target = Path(folder) / f"{key}.jpg"
    if target.is_file():
        try:
            decode_image(target.read_bytes(), target)
            print(f"painting '{painting.title}': reusing {target}")
            return target
        except ValueError:
            print(f"painting '{painting.title}': {target} is not a readable image; downloading it again")
    fetch_first(painting.sources, target, f"painting '{painting.title}'", timeout)
    decode_image(target.read_bytes(), target, f"painting '{painting.title}'")  # an error page is no image
    print(f"painting '{painting.title}': downloaded to {target}")
    return target


def skimage_image(source: str, role: str = "image") -> Image.Image:
    """The picture `skimage:NAME` names: skimage.data.NAME() (shipped with scikit-image, no download)."""
    name = source[len(SKIMAGE_PREFIX):]
    try:
        import skimage.data
    except ImportError as err:
        raise ImportError(f"{role} '{source}' needs scikit-image: pip install scikit-image (Colab has it)") from err
    loader = getattr(skimage.data, name, None)
    if name.startswith("_") or not callable(loader):
        raise ValueError(f"{role} '{source}': skimage.data has no image '{name}'; try skimage:chelsea, "
                         "skimage:coffee, skimage:astronaut, or pass a path or an http(s) URL")
    return Image.fromarray(np.asarray(loader()))


def open_image(source: str | os.PathLike, role: str = "image") -> Image.Image:
    """An RGB PIL image from `skimage:NAME`, an http(s) URL or a path; bad input names the input and what to do."""
    if str(source).startswith(SKIMAGE_PREFIX):
        return as_rgb_image(skimage_image(str(source), role))
    if is_url(source):
        return decode_image(fetch_url(str(source), role), source, role)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{role} '{source}' not found; pass a full path, an http(s) URL or skimage:NAME")
    return decode_image(path.read_bytes(), source, role)


def as_rgb_image(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """RGB version of any PIL image: gray repeated on 3 channels, transparency flattened onto `background`."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode in ("I", "I;16", "I;16B", "F"):
        values = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.uint8(values / max(values.max(), 1.0) * 255))
    return image.convert("RGB")


def decode_image(data: bytes, source: str | os.PathLike, role: str = "image") -> Image.Image:
    """Decode image bytes to an RGB PIL image; data that is no image names the input and what to do."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(
            f"{role} '{source}' is not a readable image ({type(err).__name__}: {err}); "
            "pass a JPEG, PNG, BMP or WebP file, or re-save it with an image editor"
        ) from err
    return as_rgb_image(image)


def resize_long_side(image: Image.Image, size: int) -> Image.Image:
    """Resize so the longer side is `size` px, keeping the aspect ratio (bicubic, antialiased)."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if new_size == image.size else image.resize(new_size, Image.Resampling.BICUBIC)


def check_vgg_size(height: int, width: int, role: str = "image", source: str | os.PathLike = "") -> None:
    """Raise if an image is too small for VGG19's four poolings before conv5_1."""
    if min(height, width) < MIN_SIDE:
        raise ValueError(
            f"{role} '{source}' would be {width}x{height} px, but VGG19 halves the size 4 times before conv5_1, so "
            f"both sides must be at least {MIN_SIDE} px: raise the size in the parameters cell "
            "(IMAGE_SIZE) or crop the image to a less elongated shape"
        )


def load_image(source: str | os.PathLike, size: int, role: str = "image",
               device: torch.device | str = "cpu") -> Tensor:
    """Image by path, URL or skimage:NAME as a (1, 3, H, W) tensor in [0, 1], its longer side resized to `size` px."""
    image = resize_long_side(open_image(source, role), size)
    check_vgg_size(image.height, image.width, role, source)
    return (pil_to_tensor(image).float() / 255).unsqueeze(0).to(device)


def describe_source(source: str | os.PathLike) -> str:
    """A short caption for an image source: the painting's title and artist, or the file name."""
    painting = next((p for key, p in PAINTINGS.items()
                     if str(source) in p.sources or Path(str(source)).name == f"{key}.jpg"), None)
    if painting is not None:
        return f"{painting.title} ({painting.artist}, {painting.year})"
    return str(source) if str(source).startswith(SKIMAGE_PREFIX) else os.path.basename(str(source))
