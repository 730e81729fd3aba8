"""The workflows in workflows/ load as they are: every node type exists, every link joins matching types,
every widget value is valid for its input, and the example images they name ship in example_images/. They open
readable: nodes apart, links in the open, the whole graph in view with its instructions first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fusion_style
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
EXAMPLES = ROOT / "example_images"

IMAGE_FILE = "IMAGE_FILE"  # a combo of the files in ComfyUI/input: here, the pack's example_images/
VIDEO_FILE = "VIDEO_FILE"  # likewise, for Load Video
UPLOAD = {"image_upload": True}
# The core nodes the workflows use, as ComfyUI 0.3.64 declares them (nodes.py): INPUT_TYPES, RETURN_TYPES.
CORE_NODES = {
    "LoadImage": ({"required": {"image": (IMAGE_FILE, UPLOAD)}}, ("IMAGE", "MASK")),
    "LoadImageMask": (
        {"required": {"image": (IMAGE_FILE, UPLOAD), "channel": (["alpha", "red", "green", "blue"], {})}},
        ("MASK",),
    ),
    "InvertMask": ({"required": {"mask": ("MASK", {})}}, ("MASK",)),
    "SaveImage": ({"required": {"images": ("IMAGE", {}), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}, ()),
    # comfy_extras/nodes_video.py (V3 schemas): Load Video -> Get Video Components; Create Video -> Save Video
    "LoadVideo": ({"required": {"file": (VIDEO_FILE, {"video_upload": True})}}, ("VIDEO",)),
    "GetVideoComponents": ({"required": {"video": ("VIDEO", {})}}, ("IMAGE", "AUDIO", "FLOAT")),
    "CreateVideo": (
        {
            "required": {
                "images": ("IMAGE", {}),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0}),
            },
            "optional": {"audio": ("AUDIO", {})},
        },
        ("VIDEO",),
    ),
    "SaveVideo": (
        {
            "required": {
                "video": ("VIDEO", {}),
                "filename_prefix": ("STRING", {"default": "video/ComfyUI"}),
                "format": (["auto", "mp4"], {"default": "auto"}),
                "codec": (["auto", "h264"], {"default": "auto"}),
            }
        },
        (),
    ),
    "ImageScaleBy": (
        {
            "required": {
                "image": ("IMAGE", {}),
                "upscale_method": (["nearest-exact", "bilinear", "area", "bicubic", "lanczos"], {}),
                "scale_by": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}),
            }
        },
        ("IMAGE",),
    ),
}
NOTE_NODES = {"Note", "MarkdownNote"}  # frontend-only: one text widget, never sent to the server
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", IMAGE_FILE, VIDEO_FILE)
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")  # the frontend's control_after_generate widget


def node_spec(kind: str) -> tuple[dict, tuple]:
    """({input name: (type, options)} in declared order, output types) of a node type."""
    if kind in CORE_NODES:
        inputs, outputs = CORE_NODES[kind]
    else:
        cls = fusion_style.NODE_CLASS_MAPPINGS[kind]
        inputs, outputs = cls.INPUT_TYPES(), cls.RETURN_TYPES
    ordered = {}
    for section in ("required", "optional"):
        for name, (input_type, *rest) in inputs.get(section, {}).items():
            ordered[name] = (input_type, rest[0] if rest else {}, section)
    return ordered, outputs


def is_widget(input_type, options: dict) -> bool:
    return (isinstance(input_type, list) or input_type in WIDGET_TYPES) and not options.get("forceInput")


def widget_layout(kind: str) -> list[tuple[str, object, dict]]:
    """The values the frontend saves in widgets_values, in its order: declared widgets, a control value after a
    seed, and the upload button's value after the required widgets of a node with an image upload."""
    layout, upload = [], False
    inputs, _ = node_spec(kind)
    for section in ("required", "optional"):
        for name, (input_type, options, where) in inputs.items():
            if where != section or not is_widget(input_type, options):
                continue
            layout.append((name, input_type, options))
            if input_type == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                layout.append((f"{name}: control_after_generate", CONTROL_VALUES, {}))
            upload = upload or options.get("image_upload", False) or options.get("video_upload", False)
        if section == "required" and upload:
            layout.append(("upload", ["image"], {}))
    return layout


def check_value(where: str, value, input_type, options: dict) -> None:
    if input_type in (IMAGE_FILE, VIDEO_FILE):
        assert isinstance(value, str) and (EXAMPLES / value).is_file(), f"{where}: {value!r} is not in example_images/"
    elif isinstance(input_type, (list, tuple)):
        assert value in input_type, f"{where}: {value!r} is not one of {input_type}"
    elif input_type in ("INT", "FLOAT"):
        number = int if input_type == "INT" else (int, float)
        assert isinstance(value, number) and not isinstance(value, bool), f"{where}: {value!r} is not a {input_type}"
        assert options.get("min", value) <= value <= options.get("max", value), f"{where}: {value} out of range"
    elif input_type == "STRING":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
    elif input_type == "BOOLEAN":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"


@pytest.fixture(params=WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def workflow(request) -> dict:
    return json.loads(request.param.read_text(encoding="utf-8"))


def test_the_workflows_ship_with_previews():
    for path in WORKFLOWS:
        assert path.with_suffix(".jpg").is_file(), f"{path.name} has no preview image"


def test_templates_are_numbered_simplest_first():
    # The Templates menu (ComfyUI 0.3.64 app/custom_node_manager.py, frontend 1.27 workflowTemplatesStore) has no
    # index or metadata for a custom node pack's templates: the server lists workflows/*.json in the order the
    # file system returns them (glob, unsorted), the frontend keeps that order and shows each one's file name as
    # its title and the same name with '_' and '-' as spaces as its description. So the file names carry the
    # order (a leading number: alphabetical listings, e.g. on Windows, show the basic workflow first) and read
    # as titles. The print workflow has the name issue 15 gives it, which sorts after the numbered ones.
    assert [path.stem for path in WORKFLOWS] == [
        "1_basic",
        "2_keep_colors",
        "3_masked",
        "4_two_styles_regions",
        "5_upscale",
        "7_video",
        "fusion_print_2048",
    ]


def test_templates_menu_serves_workflows():
    # ComfyUI serves a pack's templates from the first of these folders that exists (app/custom_node_manager.py):
    # any other one beside workflows/ would hide the workflows from the Templates menu.
    folders = ["example_workflows", "example", "examples", "workflow", "workflows"]
    assert [name for name in folders if (ROOT / name).is_dir()] == ["workflows"]


def test_ui_format(workflow):
    assert workflow["version"] == 0.4
    ids = [node["id"] for node in workflow["nodes"]]
    assert len(ids) == len(set(ids)) and workflow["last_node_id"] >= max(ids)
    assert workflow["last_link_id"] >= max(link[0] for link in workflow["links"])


def test_node_types_exist(workflow):
    kinds = {node["type"] for node in workflow["nodes"]}
    unknown = kinds - set(fusion_style.NODE_CLASS_MAPPINGS) - set(CORE_NODES) - NOTE_NODES
    assert not unknown, f"unknown node types {unknown}"
    assert {"FusionStyleLoadVGG", "FusionStyleFusedOptimize"} <= kinds and kinds & {"SaveImage", "SaveVideo"}


def test_links_connect_matching_types(workflow):
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, link_type in workflow["links"]:
        source, sink = nodes[origin], nodes[target]
        _, outputs = node_spec(source["type"])
        inputs, _ = node_spec(sink["type"])
        output, slot = source["outputs"][origin_slot], sink["inputs"][target_slot]
        assert outputs[origin_slot] == output["type"] == link_type, f"link {link_id}: output type"
        assert link_id in output["links"] and slot["link"] == link_id, f"link {link_id}: not recorded on its nodes"
        assert slot["name"] in inputs, f"link {link_id}: {sink['type']} has no input {slot['name']!r}"
        assert inputs[slot["name"]][0] == slot["type"] == link_type, f"link {link_id}: {link_type} into {slot}"
    link_ids = {link[0] for link in workflow["links"]}
    for node in nodes.values():
        if node["type"] in NOTE_NODES:
            continue
        inputs, _ = node_spec(node["type"])
        linked = {slot["name"] for slot in node.get("inputs", []) if slot["link"] is not None}
        assert {slot["link"] for slot in node.get("inputs", []) if slot["link"] is not None} <= link_ids
        for name, (input_type, options, section) in inputs.items():
            if section == "required" and not is_widget(input_type, options):
                assert name in linked, f"node {node['id']} ({node['type']}): required input {name!r} not connected"


def test_widget_values_are_valid(workflow):
    for node in workflow["nodes"]:
        where = f"node {node['id']} ({node['type']})"
        values = node.get("widgets_values", [])
        if node["type"] in NOTE_NODES:
            assert len(values) == 1 and isinstance(values[0], str)
            continue
        layout = widget_layout(node["type"])
        assert len(values) == len(layout), f"{where}: {len(values)} widget values for {[n for n, _, _ in layout]}"
        for value, (name, input_type, options) in zip(values, layout, strict=True):
            check_value(f"{where}.{name}", value, input_type, options)


def test_a_note_says_what_goes_where(workflow):
    (note,) = [node for node in workflow["nodes"] if node["type"] in NOTE_NODES]
    text = note["widgets_values"][0]
    assert "ComfyUI/models/vgg" in text and "ComfyUI/input" in text
    for node in workflow["nodes"]:
        if node["type"] in ("LoadImage", "LoadImageMask", "LoadVideo"):
            assert node["widgets_values"][0] in text, f"the note does not name {node['widgets_values'][0]}"


def test_optional_tuning_inputs_are_at_the_library_defaults(workflow):
    # What a workflow does not show off stays at fusion_core's defaults (e.g. the patch matcher), so a default
    # changed in the library is a failing test here rather than workflows that quietly run the old way.
    tuning = {
        "FusionStyleGlobalStyleLoss": ("layers", "blend"),
        "FusionStyleLocalPatchLoss": ("layer", "patch_size", "stride", "blend"),
        "FusionStyleFusedOptimize": (
            "content_layer",
            "init",
            "optimizer",
            "learning_rate_mode",
            "learning_rate",
            "tv_weight",
            "matcher",
            "rematch_every",
            "mixed_precision",
            "preset",
        ),
    }
    for node in workflow["nodes"]:
        if node["type"] not in tuning:
            continue
        layout = widget_layout(node["type"])
        values = {name: value for (name, _, _), value in zip(layout, node["widgets_values"], strict=True)}
        for name in tuning[node["type"]]:
            (options,) = [options for input_name, _, options in layout if input_name == name]
            assert values[name] == options["default"], f"node {node['id']}.{name}: {values[name]!r}"


def test_load_vgg_defaults_to_the_official_weights(workflow):
    (loader,) = [node for node in workflow["nodes"] if node["type"] == "FusionStyleLoadVGG"]
    assert loader["widgets_values"][0] == "vgg19"


# --- what the issue-4 workflows show ---------------------------------------------------------------------


def load(name: str) -> tuple[dict, dict]:
    """(nodes by id, links by id) of workflows/<name>.json."""
    workflow = json.loads((ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))
    return {node["id"]: node for node in workflow["nodes"]}, {link[0]: link for link in workflow["links"]}


def source(nodes: dict, links: dict, node: dict, input_name: str) -> dict | None:
    """The node feeding ``input_name`` of ``node``, or None if it is not connected."""
    (slot,) = [slot for slot in node["inputs"] if slot["name"] == input_name]
    return None if slot["link"] is None else nodes[links[slot["link"]][1]]


def chain_of_losses(nodes: dict, links: dict, optimizer: dict) -> list[dict]:
    """The loss nodes chained into ``optimizer``, first to last."""
    chain, node = [], source(nodes, links, optimizer, "style_losses")
    while node is not None:
        chain.insert(0, node)
        node = source(nodes, links, node, "style_losses")
    return chain


def test_two_styles_regions_gives_each_style_its_own_region():
    nodes, links = load("4_two_styles_regions")
    (optimizer,) = [n for n in nodes.values() if n["type"] == "FusionStyleFusedOptimize"]
    chain = chain_of_losses(nodes, links, optimizer)
    kinds = ["FusionStyleGlobalStyleLoss", "FusionStyleLocalPatchLoss"] * 2
    assert [n["type"] for n in chain] == kinds  # all four losses in one chain
    styles = [source(nodes, links, n, "style_image")["widgets_values"][0] for n in chain]
    masks = [source(nodes, links, n, "mask") for n in chain]
    assert styles[0] == styles[1] != styles[2] == styles[3]  # a Global + Local pair per style
    assert masks[0] is masks[1] and masks[2] is masks[3]  # each pair shares its region
    # The second region is the inverse of the first, so the two cover the image between them.
    assert masks[2]["type"] == "InvertMask" and source(nodes, links, masks[2], "mask") is masks[0]
    assert all(n["widgets_values"][-1] == 1.0 for n in chain)  # blend: each style at full weight in its region


def test_keep_colors_runs_luminance_and_histogram_side_by_side():
    nodes, links = load("2_keep_colors")
    optimizers = [n for n in nodes.values() if n["type"] == "FusionStyleFusedOptimize"]
    layout = [name for name, _, _ in widget_layout("FusionStyleFusedOptimize")]
    colors = sorted(n["widgets_values"][layout.index("color")] for n in optimizers)
    assert colors == ["histogram", "luminance"]
    # The same losses and content for both; only the colour mode differs.
    assert len({id(chain_of_losses(nodes, links, n)[-1]) for n in optimizers}) == 1
    assert len({id(source(nodes, links, n, "content_image")) for n in optimizers}) == 1
    others = [[v for name, v in zip(layout, n["widgets_values"], strict=True) if name != "color"] for n in optimizers]
    assert others[0] == others[1]
    saves = [n for n in nodes.values() if n["type"] == "SaveImage"]
    assert {id(source(nodes, links, n, "images")) for n in saves} == {id(n) for n in optimizers}


# --- how the workflows look when they open (issue 16) --------------------------------------------------------
# Geometry as the frontend (comfyui_frontend_package 1.27, litegraph) draws it: a node's `pos` is the top-left of
# its body, its title bar (NODE_TITLE_HEIGHT) sits above that, an unplaced input or output slot i is drawn at
# pos + (10, (i + 0.7) * NODE_SLOT_HEIGHT) on the left edge or at pos + (size[0] + 1 - 10, ...) on the right edge
# (LGraphNode.getConnectionPos), and the saved view maps the graph to the canvas element as
# (graph + extra.ds.offset) * extra.ds.scale (DragAndScale.convertOffsetToCanvas).
TITLE_HEIGHT, SLOT_HEIGHT = 30, 20
BADGE_HEIGHT = 20  # a custom node's source badge (the pack's name) stands on its title bar, at the right
GAP = 40  # the least room between two node boxes
# A 1600 x 1000 browser window: the canvas starts right of the side toolbar (64 px) and below the workflow tabs and
# the top menu (38 + 40 px), as measured in the frontend with a headless browser; the minimap (shown by default) and
# the zoom controls cover its bottom-right corner, the canvas info (frame rate, node count) its bottom-left one.
WINDOW, SIDE_TOOLBAR, TOP_MENU = (1600, 1000), 64, 78
CANVAS = (WINDOW[0] - SIDE_TOOLBAR, WINDOW[1] - TOP_MENU)
MARGIN = 10
MINIMAP_CORNER, INFO_CORNER = (300, 270), (130, 90)
READABLE_SCALE = 0.6  # the widgets' text below this is hard to read


def box(node: dict) -> tuple[float, float, float, float]:
    """(left, top, right, bottom) of a node on the canvas, its title bar and a custom node's badge included."""
    (x, y), (w, h) = node["pos"], node["size"]
    badge = BADGE_HEIGHT if node["type"] in fusion_style.NODE_CLASS_MAPPINGS else 0
    return x, y - TITLE_HEIGHT - badge, x + w, y + h


def slot_position(node: dict, slot: int, is_input: bool) -> tuple[float, float]:
    (x, y), (w, _) = node["pos"], node["size"]
    slots = [s for s in node.get("inputs" if is_input else "outputs", []) if "widget" not in s]
    index = slots.index(node["inputs" if is_input else "outputs"][slot])
    return (x + SLOT_HEIGHT / 2 if is_input else x + w + 1 - SLOT_HEIGHT / 2), y + (index + 0.7) * SLOT_HEIGHT


def segment_hits_box(a: tuple, b: tuple, rect: tuple) -> bool:
    """Whether the segment a-b meets the rectangle (Liang-Barsky clipping)."""
    (x0, y0), (x1, y1) = a, b
    left, top, right, bottom = rect
    t0, t1 = 0.0, 1.0
    for p, q in ((x0 - x1, x0 - left), (x1 - x0, right - x0), (y0 - y1, y0 - top), (y1 - y0, bottom - y0)):
        if p == 0:
            if q < 0:
                return False
            continue
        t = q / p
        if p < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
        if t0 > t1:
            return False
    return True


def to_screen(workflow: dict, x: float, y: float) -> tuple[float, float]:
    view = workflow["extra"]["ds"]
    (dx, dy), scale = view["offset"], view["scale"]
    return (x + dx) * scale, (y + dy) * scale


def test_nodes_keep_room_between_them(workflow):
    nodes = workflow["nodes"]
    for i, first in enumerate(nodes):
        for second in nodes[i + 1 :]:
            (l1, t1, r1, b1), (l2, t2, r2, b2) = box(first), box(second)
            apart = max(l2 - r1, l1 - r2, t2 - b1, t1 - b2)
            assert apart >= GAP, f"nodes {first['id']} and {second['id']} are {apart:.0f} px apart (< {GAP})"


def test_links_run_left_to_right_in_the_open(workflow):
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, _ in workflow["links"]:
        start = slot_position(nodes[origin], origin_slot, is_input=False)
        end = slot_position(nodes[target], target_slot, is_input=True)
        # Out of the right edge of its node and into the left edge of the next one: behind neither of them.
        assert end[0] - start[0] >= GAP, f"link {link_id} runs right to left, behind node {origin} or {target}"
        for node in nodes.values():
            if node["id"] not in (origin, target):
                assert not segment_hits_box(start, end, box(node)), f"link {link_id} runs behind node {node['id']}"


def test_the_saved_view_shows_every_node(workflow):
    scale = workflow["extra"]["ds"]["scale"]
    assert scale >= READABLE_SCALE, f"zoomed out to {scale}: the widgets are too small to read"
    width, height = CANVAS
    for node in workflow["nodes"]:
        left, top, right, bottom = box(node)
        (x0, y0), (x1, y1) = to_screen(workflow, left, top), to_screen(workflow, right, bottom)
        where = f"node {node['id']} ({node.get('title', node['type'])}) at {x0:.0f},{y0:.0f}-{x1:.0f},{y1:.0f}"
        assert x0 >= MARGIN and x1 <= width - MARGIN, f"{where}: off the canvas' sides"
        assert y0 >= MARGIN and y1 <= height - MARGIN, f"{where}: above or below the canvas"
        assert not (x1 > width - MINIMAP_CORNER[0] and y1 > height - MINIMAP_CORNER[1]), f"{where}: under the minimap"
        assert not (x0 < INFO_CORNER[0] and y1 > height - INFO_CORNER[1]), f"{where}: under the canvas info"


def test_the_note_comes_first(workflow):
    (note,) = [node for node in workflow["nodes"] if node["type"] in NOTE_NODES]
    others = [node for node in workflow["nodes"] if node is not note]
    assert all(box(note)[1] <= box(node)[1] for node in others), "a node sits above the note"
    assert all(box(note)[0] <= box(node)[0] for node in others), "a node sits left of the note"


def test_the_note_starts_with_what_to_do_before_queueing(workflow):
    # The first lines are what a template's Note shows before anyone scrolls: where the files go and how long a
    # run takes (the measured CPU figure; no GPU figure has been measured).
    (note,) = [node for node in workflow["nodes"] if node["type"] in NOTE_NODES]
    first = "\n".join(note["widgets_values"][0].splitlines()[:4])
    for words in ("example_images/", "ComfyUI/input/", "ComfyUI/models/vgg/", "548 MB"):
        assert words in first, f"the note's first lines do not say {words!r}"
    assert re.search(r"\d+ min \d+ s on a 2-core CPU", first), "the note's first lines give no measured CPU time"


def test_print_workflow_makes_a_2048_px_print_with_a_shorter_last_level():
    nodes, _ = load("fusion_print_2048")
    (optimizer,) = [n for n in nodes.values() if n["type"] == "FusionStyleFusedOptimize"]
    layout = widget_layout(optimizer["type"])
    values = {name: value for (name, _, _), value in zip(layout, optimizer["widgets_values"], strict=True)}
    assert values["size"] == 2048
    assert 0 < values["final_iterations"] < values["iterations"]  # the last level costs 4x the one before
    assert values["tile"] == 0  # tiles only where a level would not fit: the device decides
