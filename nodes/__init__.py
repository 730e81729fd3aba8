"""The ComfyUI nodes: Load VGG -> Global/Local style losses (chained) -> Fused Style Optimize.

Only ``comfy.py`` talks to ComfyUI; the other modules adapt ComfyUI's tensors and call fusion_core.
"""

from . import comfy
from .loader import FusionStyleLoadVGG
from .losses import FusionStyleGlobalStyleLoss, FusionStyleLocalPatchLoss
from .optimize import FusionStyleFusedOptimize
from .temporal import FusionStyleTemporalConsistency

comfy.register_models_folder()  # models/vgg; a no-op outside ComfyUI

NODE_CLASS_MAPPINGS = {
    "FusionStyleLoadVGG": FusionStyleLoadVGG,
    "FusionStyleGlobalStyleLoss": FusionStyleGlobalStyleLoss,
    "FusionStyleLocalPatchLoss": FusionStyleLocalPatchLoss,
    "FusionStyleFusedOptimize": FusionStyleFusedOptimize,
    "FusionStyleTemporalConsistency": FusionStyleTemporalConsistency,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FusionStyleLoadVGG": "Load VGG",
    "FusionStyleGlobalStyleLoss": "Global Style Loss (Gram)",
    "FusionStyleLocalPatchLoss": "Local Patch Loss (MRF)",
    "FusionStyleFusedOptimize": "Fused Style Optimize",
    "FusionStyleTemporalConsistency": "Temporal Consistency (video)",
}
