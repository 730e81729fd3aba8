"""fusion_core: neural style transfer fusing a global (Gram) and a local (MRF patch) style loss.

from fusion_core import load_vgg, load_image, save_image, GlobalStyle, LocalStyle, Settings
from fusion_core.stylize import stylize

vgg = load_vgg("vgg19")                      # or a path to a .safetensors / .pth file
content, style = load_image("cat.png"), load_image("starry_night.jpg")
image = stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], Settings(size=512))
save_image(image, "out.png")
"""

# ``stylize`` the function is imported from ``fusion_core.stylize``: bound here under the same name it would hide
# that module (``import fusion_core.stylize as m`` would give the function), so the package names the module.
from . import stylize
from .config import GlobalStyle, LocalStyle, Progress, Settings, StyleTerm
from .errors import Cancelled, FusionError
from .images import load_image, save_image
from .vgg import VGGFeatures, random_vgg
from .weights import download_vgg19, load_vgg, vgg_from_state_dict

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
    "stylize",  # the module
    "vgg_from_state_dict",
]
