"""fusion-style as a ComfyUI custom node pack: clone this repository into ComfyUI/custom_nodes/ and restart.

ComfyUI imports this folder as a package, so the nodes reach the library with relative imports
(``from ..fusion_core import ...``); no sys.path changes. Importing does no heavy work and no network access.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

# The frontend extension in web/: the Templates browser lists the pack's workflows in their numbered order.
WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
