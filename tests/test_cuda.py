"""The whole default path on a CUDA GPU: fast matcher with propagation, float16 pass, memory check, host syncs.

Skipped where no CUDA GPU is present (the reason is printed in pytest's summary). benchmarks/device.py measures
speed and memory there.
"""

import warnings

import pytest
import torch
from helpers import smooth_image, tiny_vgg

from fusion_core import GlobalStyle, LocalStyle, Settings, memory
from fusion_core.matching import MATCHERS, nearest_patches
from fusion_core.stylize import stylize
from fusion_core.targets import build_criterion

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here: the CUDA path (float16, device matcher) is not run"
)


def exact_scores(query, style, indices):
    """<q, s> / |s| of each query patch with the style patch ``indices`` picks, computed by unfolding."""
    q = torch.nn.functional.unfold(query.float(), 3)[0].T
    s = torch.nn.functional.unfold(style.float(), 3)[0].T
    return (q * s[indices]).sum(1) / s[indices].norm(dim=1).clamp_min(1e-8)


def test_default_run_on_cuda_reaches_the_cpu_float32_result():
    content, style = smooth_image(48, 64, seed=1), smooth_image(64, 64, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]
    settings = Settings(final_iterations=0, size=64, levels=2, iterations=30)  # defaults: fast matcher, float16 on CUDA
    vgg = tiny_vgg(width=8)
    cpu = stylize(vgg, content, styles, Settings(**{**vars(settings), "mixed_precision": False}))
    gpu_styles = [GlobalStyle(style.cuda()), LocalStyle(style.cuda())]
    gpu = stylize(tiny_vgg(width=8).cuda(), content.cuda(), gpu_styles, settings)
    assert gpu.device.type == "cuda" and torch.isfinite(gpu).all()
    judge = build_criterion(vgg, content, styles, Settings(size=64, levels=1, mixed_precision=False), (48, 64))
    start = float(judge(content, rematch=True)["total"])
    scores = {name: float(judge(image.cpu(), rematch=True)["total"]) for name, image in (("cpu", cpu), ("gpu", gpu))}
    assert scores["gpu"] < 0.8 * start and abs(scores["gpu"] - scores["cpu"]) < 0.15 * scores["cpu"], scores


def test_fast_matcher_with_propagation_on_cuda():
    vgg = tiny_vgg(width=8).cuda()
    with torch.no_grad():
        query = vgg(smooth_image(96, 128, seed=3).cuda(), ["relu3_1"])["relu3_1"]
        style = vgg(smooth_image(96, 96, seed=4).cuda(), ["relu3_1"])["relu3_1"]
    search = MATCHERS["fast"](style, 3, 1, None)
    moved = query + 0.05 * torch.randn(query.shape, generator=torch.Generator("cuda").manual_seed(0), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        first = search(query, None)  # a full search
        second = search(moved, first)  # propagation: the previous match is one of its candidates
    best = exact_scores(query, style, nearest_patches(query, style))
    found = exact_scores(query, style, first)
    assert (found >= best - 1e-3 * best.abs()).float().mean() > 0.9  # near-best, as on the CPU
    kept, propagated = exact_scores(moved, style, first), exact_scores(moved, style, second)
    assert (propagated >= kept - 1e-4 * kept.abs()).all()  # never worse than keeping the previous match
    assert (propagated > kept + 1e-4 * kept.abs()).any()  # and better somewhere


def test_memory_check_on_cuda_counts_what_torch_holds():
    free, _ = torch.cuda.mem_get_info()
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del held  # now cached by PyTorch's allocator, not free for the driver
    assert memory.available_bytes(torch.device("cuda")) >= free - 2**20
    vgg = tiny_vgg(width=8).cuda()
    style = smooth_image(64, 64, seed=2).cuda()
    styles = [GlobalStyle(style), LocalStyle(style)]
    memory.plan_level(vgg, (256, 256), styles, Settings(size=256))  # fits
    with pytest.raises(Exception, match="needs about"):
        memory.plan_level(vgg, (256, 256), styles, Settings(size=256), available=1)


def test_an_iteration_synchronises_with_the_host_once():
    content, style = smooth_image(48, 64, seed=1).cuda(), smooth_image(64, 64, seed=2).cuda()
    vgg = tiny_vgg(width=8).cuda()
    marks = []  # (iteration, synchronisations so far)
    settings = Settings(final_iterations=0, size=64, levels=1, iterations=6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")  # torch warns at every call that waits for the GPU
        try:
            stylize(
                vgg,
                content,
                [GlobalStyle(style), LocalStyle(style)],
                settings,
                on_progress=lambda p: marks.append((p.iteration, sum("synchroniz" in str(w.message) for w in caught))),
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_iteration = [after - before for (_, before), (_, after) in zip(marks, marks[1:], strict=False)]
    assert per_iteration and max(per_iteration) <= 1, marks


@pytest.mark.parametrize("mixed_precision", [False, True], ids=["float32", "float16"])
@pytest.mark.parametrize("split", [None, "pool2"])
def test_tiled_gradient_on_cuda_equals_the_untiled_one(mixed_precision, split):
    """The tiled evaluation (two passes, the recorded last tile, the gradient scale across tiles; with a split,
    the deep layers' whole pass) on the GPU."""
    from fusion_core.tiling import TiledCriterion

    shape = (61, 77)
    vgg = tiny_vgg(width=8).cuda()
    content, style = smooth_image(*shape, seed=1).cuda(), smooth_image(54, 83, seed=2).cuda()
    layers = ("relu1_1", "relu2_1", "relu3_1")
    styles = [GlobalStyle(style, layers=layers), LocalStyle(style)]
    settings = Settings(size=77, levels=1, mixed_precision=mixed_precision, matcher="exact")
    whole = build_criterion(vgg, content, styles, settings, shape)
    tile = 50 if split is None else 30
    tiled = TiledCriterion(build_criterion(vgg, content, styles, settings, shape, tile=tile), shape, tile, split)
    assert tiled.tiles >= 4
    image = smooth_image(*shape, seed=3).cuda().requires_grad_(True)
    whole.evaluate(image, rematch=True)
    expected = image.grad.clone()
    tiled.evaluate(image, rematch=True)
    error = (image.grad - expected).abs().max() / expected.abs().max()
    assert error < (2e-2 if mixed_precision else 1e-5)  # float16 rounds each crop's pass on its own
