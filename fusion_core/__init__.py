"""fusion_core: neural style transfer fusing a global (Gram) and a local (MRF patch) style loss.

from fusion_core import load_vgg, load_image, save_image, stylize, GlobalStyle, LocalStyle, Settings

vgg = load_vgg("vgg19")                      # or a path to a .safetensors / .pth file
content, style = load_image("cat.png"), load_image("starry_night.jpg")
image = stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], Settings(size=512))
save_image(image, "out.png")
"""

from .config import GlobalStyle, LocalStyle, Progress, Settings, StyleTerm
from .errors import Cancelled, FusionError
from .images import load_image, save_image
from .stylize import stylize
from .vgg import VGGFeatures, random_vgg, vgg_from_state_dict
from .weights import download_vgg19, load_vgg

__all__ = [
    "Cancelled",
    "FusionError",
    "GlobalStyle",
    "LocalStyle",
    "Progress",
    "Settings",
    "StyleTerm",
    "VGGFeatures",
    "download_vgg19",
    "load_image",
    "load_vgg",
    "random_vgg",
    "save_image",
    "stylize",
    "vgg_from_state_dict",
]
