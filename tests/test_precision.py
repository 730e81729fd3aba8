"""Mixed precision: which 16-bit type runs where, the gradient scale, and agreement with float32 (CPU, CUDA)."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import smooth_image, tiny_vgg

import fusion_core.criterion as criterion_module
import fusion_core.stylize as stylize_module
import fusion_core.targets as targets_module
from fusion_core import FusionError, GlobalStyle, LocalStyle, Settings, precision
from fusion_core.config import PAPER_GLOBAL_LAYERS
from fusion_core.lbfgs import LBFGS
from fusion_core.stylize import stylize
from fusion_core.targets import build_criterion

NATIVE_BFLOAT16 = precision.native_bfloat16  # the real probe (conftest replaces it during tests)
NO_GPU = "no CUDA GPU here: the float16 autocast path only runs on CUDA"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)


@pytest.mark.parametrize("native", [False, True])
def test_mixed_precision_applies_where_the_hardware_has_16_bit_floats(native, monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda: native)
    assert precision.mixed_dtype(torch.device("cpu")) == (torch.bfloat16 if native else None)
    assert precision.mixed_dtype("cuda") == torch.float16
    assert precision.mixed_dtype("cuda", wanted=False) is None
    assert precision.mixed_dtype("cpu", wanted=False) is None
    assert precision.mixed_dtype("mps") is None


def test_native_bfloat16_follows_the_cpu_probes(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", NATIVE_BFLOAT16)
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert precision.native_bfloat16() == (avx512_bf16 or amx)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not precision.native_bfloat16()  # no oneDNN: bfloat16 convolutions would not use the instructions


def test_gradient_scaling_is_exact_and_neutral():
    # The 16-bit pass scales gradients up on the way in and back down at the image: powers of two, exact.
    grads = []
    for enabled in (False, True):
        scale = precision.GradientScale(enabled)
        scale.scale = 2.0**20
        x = torch.linspace(-3, 3, 12).reshape(3, 4).requires_grad_(True)
        out = scale.for_losses(scale.unscale_at(x) * 3)
        (out.square().sum() * 1e-9).backward()
        grads.append(x.grad)
        if enabled:  # it saw the gradient entering the pass, unscaled: d/dout of 1e-9 * out^2 = 2e-9 * out
            assert torch.equal(scale.largest, (2e-9 * (3 * x.detach()).abs()).amax())
    assert torch.equal(grads[0], grads[1])


def test_gradient_scale_follows_the_gradients_and_backs_off_on_overflow():
    scale = precision.GradientScale(True)
    for largest in (3e-9, 1e-4, 700.0):
        assert scale.update(largest, finite=True) is False
        # a power of two that puts the largest gradient in (TARGET / 2, TARGET]
        assert math.log2(scale.scale).is_integer() and scale.TARGET / 2 < largest * scale.scale <= scale.TARGET
    scale.scale = 2.0**30
    assert scale.update(float("inf"), finite=False) is True and scale.scale == 2.0**22  # retry, smaller
    scale.scale = scale.FLOOR
    assert scale.update(float("nan"), finite=False) is False  # nothing left to try: the caller raises
    off = precision.GradientScale(False)
    assert off.update(1e-9, finite=False) is False and off.scale == off.START


def test_float32_region_never_asks_torch_for_an_autocast_it_lacks(monkeypatch):
    # torch 2.1-2.4 raise for torch.autocast("mps", ...); those versions have no is_autocast_available either.
    def strict_autocast(device_type, *args, **kwargs):
        if device_type not in ("cpu", "cuda"):
            raise RuntimeError(f"User specified an unsupported autocast device_type '{device_type}'")
        return real_autocast(device_type, *args, **kwargs)

    real_autocast = torch.autocast
    monkeypatch.setattr(torch, "autocast", strict_autocast)
    monkeypatch.delattr(torch.amp, "is_autocast_available", raising=False)
    with precision.float32_region(torch.device("mps")):
        pass
    with torch.autocast("cpu", dtype=torch.bfloat16), precision.float32_region(torch.device("cpu")):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32  # the region autocast does not reach


def test_device_choices():
    cpu, cuda, mps = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
    assert precision.accumulation_dtype(cpu) == torch.float64
    assert precision.accumulation_dtype(cuda) == precision.accumulation_dtype(mps) == torch.float32  # no float64
    assert precision.banded_backward(cpu) and not precision.banded_backward(cuda)
    assert precision.memory_format(mps) == torch.contiguous_format


def _float16_on_cpu(monkeypatch):
    """The CUDA path (float16 autocast, the dynamic gradient scale) emulated on the CPU."""
    half = lambda device, wanted=True: torch.float16 if wanted else None  # noqa: E731
    monkeypatch.setattr(criterion_module, "mixed_dtype", half)
    monkeypatch.setattr(targets_module, "mixed_dtype", half)  # the targets' passes


def _gradient(criterion, image):
    x = image.clone().requires_grad_(True)
    criterion(x, rematch=True)["total"].backward()
    return x.grad


def float16_gradient_errors(device: str) -> tuple[float, float, float, float]:
    """The float16 path's image gradient against the float32 one's (relative norm of the difference), unscaled
    and with the dynamic gradient scale, and for each the share of gradients lost to zero.

    A narrow Caffe-convention VGG19 (activations ~50x torchvision's, like the trained network's) at 384 px with
    every weight divided by 16: the losses are means over positions, so the gradients entering the 16-bit pass
    shrink with the image's area, and these are those of a 1536 px image with the default weights (~1e-7);
    unscaled, float16 flushes many of them to zero or to a few bits."""
    h, w, k = 288, 384, 16
    content, style = smooth_image(h, w, seed=1).to(device), smooth_image(w, w, seed=2).to(device)
    vgg = tiny_vgg(width=8, convention="caffe").to(device)
    styles = [GlobalStyle(style, weight=20 / k), LocalStyle(style, weight=1e-4 / k)]
    # The paper's matches (match_content 0): with the content's share, 2 of the 331k gradient entries fall to 0 even
    # scaled, from matches that pull less there, not from the scale; the scenario is the precision path's.
    weights = {"size": w, "levels": 1, "content_weight": 20 / k, "tv_weight": 10 / k, "match_content": 0.0}
    half = build_criterion(vgg, content, styles, Settings(**weights), (h, w))
    full = build_criterion(vgg, content, styles, Settings(**weights, mixed_precision=False), (h, w))
    assert half.half_dtype == torch.float16 and full.half_dtype is None
    image = smooth_image(h, w, seed=3).to(device)
    reference = _gradient(full, image)

    def error(scale: float | None) -> tuple[float, float]:
        if scale is None:  # the dynamic scale, set from the previous evaluation's gradients
            half.gradient_scale.update(float(half.gradient_scale.largest), finite=True)
        else:
            half.gradient_scale.scale = scale
        found = _gradient(half, image)
        lost = float(((found == 0) & (reference != 0)).float().mean())
        return float((found - reference).norm() / reference.norm()), lost

    unscaled, unscaled_lost = error(1.0)
    scaled, scaled_lost = error(None)
    largest = float(half.gradient_scale.largest)
    assert largest < 1e-5 and largest * half.gradient_scale.scale > half.gradient_scale.TARGET / 2
    return unscaled, scaled, unscaled_lost, scaled_lost


def test_float16_path_emulated_on_cpu_gives_the_float32_gradient(monkeypatch):
    _float16_on_cpu(monkeypatch)
    unscaled, scaled, unscaled_lost, scaled_lost = float16_gradient_errors("cpu")
    # What remains with the scale is float16's rounding of the forward pass (~7%), not underflow. How much is lost
    # unscaled depends on the CPU's float16 arithmetic; tests/test_cuda.py asks the same of a real GPU.
    assert scaled < 0.1 and scaled < 0.6 * unscaled, (scaled, unscaled)
    # Underflow loses thousands of the 331k entries unscaled; scaled, at most an entry or two whose value is a
    # difference of near-equal terms, and which ones depends on the summation order (the thread count).
    assert scaled_lost <= 1e-5 and 100 * scaled_lost < unscaled_lost, (scaled_lost, unscaled_lost)


def test_tiled_float16_path_emulated_on_cpu_gives_the_untiled_float16_gradient(monkeypatch):
    """The gradient scale through the tiles: the largest gradient entering the pass gathered over the tiles (and,
    with a split, the deep layers' whole pass, whose gradient reaches the tiles still scaled), the image's gradient
    unscaled once. Float16 rounds each crop's pass on its own: agreement to float16's rounding, not float32's.
    (Every layer in tiles: tests/test_cuda.py.)"""
    from fusion_core.tiling import TiledCriterion

    _float16_on_cpu(monkeypatch)
    h, w = 200, 232
    content, style = smooth_image(h, w, seed=1), smooth_image(w, w, seed=2)
    vgg = tiny_vgg(width=8, convention="caffe")
    styles = [GlobalStyle(style), LocalStyle(style)]
    settings = Settings(size=w, levels=1, matcher="exact")
    whole = build_criterion(vgg, content, styles, settings, (h, w))
    tiled = TiledCriterion(build_criterion(vgg, content, styles, settings, (h, w), tile=180), (h, w), 180, "pool2")
    assert tiled.tiles >= 4 and whole.half_dtype == torch.float16
    image = smooth_image(h, w, seed=3).requires_grad_(True)
    for _ in range(2):  # the second evaluation with the scale the first one set
        whole.evaluate(image, rematch=True)
        expected = image.grad.clone()
        tiled.evaluate(image, rematch=True)
        largest, tiled_largest = float(whole.gradient_scale.largest), float(tiled.gradient_scale.largest)
        assert abs(tiled_largest - largest) <= 1e-2 * largest
        assert float((image.grad - expected).norm() / expected.norm()) < 1e-2
        for criterion in (whole, tiled):
            criterion.gradient_scale.update(largest, finite=True)


def test_an_overflow_in_float16_is_retried_with_a_smaller_scale(monkeypatch):
    _float16_on_cpu(monkeypatch)
    content, style = smooth_image(48, 64, seed=1), smooth_image(64, 64, seed=2)
    styles = [GlobalStyle(style, layers=PAPER_GLOBAL_LAYERS), LocalStyle(style)]
    half = build_criterion(tiny_vgg(), content, styles, Settings(size=64, levels=1), (48, 64))
    half.gradient_scale.scale = 2.0**60  # every gradient entering the pass overflows float16
    image = smooth_image(48, 64, seed=3).requires_grad_(True)
    optimizer = LBFGS(image)
    losses, numbers = stylize_module._evaluate(half, image, optimizer, rematch=True)
    assert torch.isfinite(image.grad).all() and half.gradient_scale.scale < 2.0**30
    full = build_criterion(tiny_vgg(), content, styles, Settings(size=64, levels=1, mixed_precision=False), (48, 64))
    assert F.cosine_similarity(image.grad.flatten(), _gradient(full, image.detach()).flatten(), dim=0) > 0.99


def test_a_non_finite_gradient_stops_the_run_with_a_clear_error(monkeypatch):
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)
    criterion = build_criterion(tiny_vgg(), content, [GlobalStyle(style)], Settings(size=32, levels=1), (24, 32))
    _, _, gram = criterion.terms[0]
    monkeypatch.setattr(gram, "forward", lambda features: features["relu1_1"].sqrt().sum() * float("nan"))
    image = smooth_image(24, 32, seed=3).requires_grad_(True)
    with pytest.raises(FusionError, match="NaN or infinite"):
        stylize_module._evaluate(criterion, image, LBFGS(image), rematch=True)


def record_activation_dtypes(vgg, dtypes):
    """Make ``vgg`` append the dtype of every activation it returns to ``dtypes``."""
    forward = vgg.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        dtypes.extend(value.dtype for value in out.values())
        return out

    vgg.forward = recording


def check_mixed_against_float32(criterion, device, half, rtol, min_cosine):
    """``criterion`` (mixed precision) runs the VGG pass in ``half`` and its losses and gradient in float32, and
    agrees with a float32 criterion on the same image."""
    image = smooth_image(24, 32, seed=3).to(device)
    dtypes = []
    record_activation_dtypes(criterion.vgg, dtypes)
    x = image.clone().requires_grad_(True)
    values = criterion(x, rematch=True)
    values["total"].backward()
    assert dtypes and set(dtypes) == {half}
    assert all(v.dtype == torch.float32 for v in values.values())
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
    reference = _criterion(device, False)
    y = image.clone().requires_grad_(True)
    expected = reference(y, rematch=True)
    expected["total"].backward()
    torch.testing.assert_close(values["total"], expected["total"], rtol=rtol, atol=0)
    assert F.cosine_similarity(x.grad.flatten(), y.grad.flatten(), dim=0) > min_cosine


def _criterion(device, mixed_precision):
    content, style = smooth_image(24, 32, seed=1).to(device), smooth_image(32, 32, seed=2).to(device)
    vgg = tiny_vgg().to(device)
    settings = Settings(size=32, levels=1, mixed_precision=mixed_precision)
    # Not relu5_1: at 24 x 32 px it has two positions, whose Gram matrix in 16 bits is mostly rounding.
    global_style = GlobalStyle(style, layers=PAPER_GLOBAL_LAYERS)
    return build_criterion(vgg, content, [global_style, LocalStyle(style)], settings, (24, 32))


def test_criterion_on_a_cpu_without_bfloat16_is_float32_whatever_the_setting(monkeypatch):
    monkeypatch.setattr(precision, "native_bfloat16", lambda: False)
    image = smooth_image(24, 32, seed=3)
    results = []
    for mixed in (False, True):
        criterion = _criterion("cpu", mixed)
        assert criterion.half_dtype is None
        x = image.clone().requires_grad_(True)
        values = criterion(x, rematch=True)
        values["total"].backward()
        results.append((values["total"].detach(), x.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_cpu_mixed_precision_runs_vgg_in_bfloat16_and_losses_in_float32(monkeypatch):
    # Forced on, so it runs on any CPU (without bfloat16 instructions it is only slower), with the path
    # CUDA's float16 takes: the same casts, gradient scaling and float32 losses.
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    criterion = _criterion("cpu", True)
    assert criterion.half_dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits: on this tiny random network the Gram term's gradient alone agrees with
    # float32 to a cosine of ~0.97, the local and content terms' to ~0.98-0.99.
    check_mixed_against_float32(criterion, "cpu", torch.bfloat16, rtol=5e-2, min_cosine=0.96)


def test_stylize_in_bfloat16_reaches_the_float32_result(monkeypatch):
    # The whole optimisation with the bfloat16 pass: its result, scored by a float32 criterion, is as good as
    # the float32 run's from the same start. Not equal: the two runs take different paths (at this tiny size
    # the final loss varies by ~10% between seeds in either precision).
    monkeypatch.setattr(precision, "native_bfloat16", lambda: True)
    content, style = smooth_image(24, 32, seed=1), smooth_image(32, 32, seed=2)
    styles = [GlobalStyle(style), LocalStyle(style)]
    settings = Settings(final_iterations=0, size=32, levels=1, iterations=40, seed=3)
    vgg = tiny_vgg(width=8)
    dtypes = []
    record_activation_dtypes(vgg, dtypes)
    judge = build_criterion(vgg, content, styles, Settings(size=32, levels=1, mixed_precision=False), (24, 32))
    start = judge(torch.rand(1, 3, 24, 32, generator=torch.Generator().manual_seed(3)), rematch=True)["total"]
    final = {}
    for mixed in (True, False):
        dtypes.clear()
        image = stylize(vgg, content, styles, replace(settings, mixed_precision=mixed))
        assert (torch.bfloat16 in dtypes) == mixed  # the targets are computed in float32 either way
        final[mixed] = float(judge(image, rematch=True)["total"])
    assert max(final.values()) < 0.5 * float(start)
    assert abs(final[True] - final[False]) < 0.15 * final[False], final


@cuda
def test_cuda_mixed_precision_runs_vgg_in_float16_and_losses_in_float32():
    criterion = _criterion("cuda", True)
    assert criterion.half_dtype == torch.float16
    check_mixed_against_float32(criterion, "cuda", torch.float16, rtol=2e-2, min_cosine=0.99)


@cuda
def test_float16_gradient_scale_on_cuda_recovers_what_float16_loses():
    unscaled, scaled, unscaled_lost, scaled_lost = float16_gradient_errors("cuda")
    assert scaled < 0.1 and scaled < 0.6 * unscaled, (scaled, unscaled)
    # Underflow loses thousands of the 331k entries unscaled; scaled, at most an entry or two whose value is a
    # difference of near-equal terms, and which ones depends on the summation order (the thread count).
    assert scaled_lost <= 1e-5 and 100 * scaled_lost < unscaled_lost, (scaled_lost, unscaled_lost)


def tf32_state() -> list:
    return [getattr(owner, name) for owner, name, _ in precision._tf32_switches()]


@pytest.fixture
def host_with_tf32():
    """TF32 switched on for convolutions and matrix products with torch's older flags, as host applications do
    (ComfyUI among them), and set back after the test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_full_float32_switches_tf32_off_inside_and_restores_the_host_setting(monkeypatch, host_with_tf32):
    monkeypatch.setattr(precision, "_cuda_present", lambda: True)  # the switches exist in every torch build
    (matmul, matmul_full), (conv, conv_full) = [((o, n), v) for o, n, v in precision._tf32_switches()]
    before = tf32_state()
    assert before[0] != matmul_full and before[1] != conv_full
    with precision.full_float32(convolutions=True):
        assert tf32_state() == [matmul_full, conv_full]
        with precision.full_float32(convolutions=False):  # nested: the inner region restores the outer one's state
            assert tf32_state() == [matmul_full, conv_full]
        assert tf32_state() == [matmul_full, conv_full]
    assert tf32_state() == before
    with precision.full_float32(convolutions=False):  # the 16-bit path: matrix products only
        assert tf32_state() == [matmul_full, before[1]]
    assert tf32_state() == before
    with pytest.raises(KeyError), precision.full_float32(convolutions=True):
        raise KeyError("restored on errors too")
    assert tf32_state() == before
    # A host that reads the older flags afterwards still can (torch >= 2.9 raises when the two APIs were mixed).
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setattr(precision, "_cuda_present", lambda: False)
    with precision.full_float32(convolutions=True):
        assert tf32_state() == before  # without CUDA nothing is touched


@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "float16"])
def test_every_pass_of_a_run_is_in_full_float32(monkeypatch, host_with_tf32, mixed):
    """The forward and backward passes of the whole and the tiled evaluation, the targets' passes and a run:
    matrix products in float32 always, convolutions on the float32 path."""
    from fusion_core.tiling import TiledCriterion

    monkeypatch.setattr(precision, "_cuda_present", lambda: True)
    if mixed:  # the float16 path, emulated on the CPU
        _float16_on_cpu(monkeypatch)
        monkeypatch.setattr(stylize_module, "mixed_dtype", criterion_module.mixed_dtype)
    host = tf32_state()
    expected = [precision._tf32_switches()[0][2], host[1] if mixed else precision._tf32_switches()[1][2]]
    seen = []  # the switches' state in every VGG forward pass and at the image gradient of every backward pass
    vgg = tiny_vgg()
    vgg.convs[0].register_forward_hook(lambda *_: seen.append(("forward", tf32_state())))
    shape, tile = (61, 77), 50
    content, style = smooth_image(*shape, seed=1), smooth_image(54, 83, seed=2)
    styles = [GlobalStyle(style, layers=("relu1_1", "relu2_1", "relu3_1")), LocalStyle(style)]
    # the content on relu3_1: 50 px tiles are too small for relu4_2's receptive field
    settings = Settings(content_layer="relu3_1", final_iterations=0, size=77, levels=1, iterations=2)
    whole = build_criterion(vgg, content, styles, settings, shape)
    tiled = TiledCriterion(build_criterion(vgg, content, styles, settings, shape, tile=tile), shape, tile, None)
    assert tiled.tiles > 1 and (whole.half_dtype == torch.float16) == mixed
    for criterion in (whole, tiled):
        image = smooth_image(*shape, seed=3).requires_grad_(True)
        image.register_hook(lambda grad: seen.append(("backward", tf32_state())) or grad)
        criterion.evaluate(image, rematch=True)
    stylize(vgg, content, styles, settings)
    assert {kind for kind, _ in seen} == {"forward", "backward"}
    assert all(state == expected for _, state in seen), seen
    assert tf32_state() == host  # the host's setting is back


@cuda
def test_float32_on_cuda_is_float32_when_the_host_switched_tf32_on(host_with_tf32):
    # cuDNN's default, and many hosts', is TF32 for float32 convolutions (10 mantissa bits): the float32 path would
    # then differ from the CPU's float32 gradient by several percent on this network.
    gradients = []
    for device in ("cpu", "cuda"):
        criterion = _criterion(device, False)
        image = smooth_image(24, 32, seed=3).to(device).requires_grad_(True)
        criterion.evaluate(image, rematch=True)
        gradients.append(image.grad.cpu())
    error = (gradients[1] - gradients[0]).abs().max() / gradients[0].abs().max()
    assert error < 1e-5, float(error)
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # the host's setting is back
