"""The feature extractor under autograd: the same gradients as a plain VGG, from less kept memory."""

import pytest
import torch
import torch.nn.functional as F
from helpers import saved_bytes, smooth_image, tiny_vgg

from fusion_core import lean_backward
from fusion_core import vgg as vgg_module


def plain_forward(vgg, image, layers):
    """A direct VGG pass with torch's own conv, ReLU and pooling (autograd keeps what it always keeps),
    in the default (channels-first) memory layout."""
    x, out, conv_i = vgg.normalize(image).contiguous(), {}, 0
    for name in vgg.names[: max(vgg.names.index(n) for n in layers) + 1]:
        if name.startswith("conv"):
            conv = vgg.convs[conv_i]
            x = F.conv2d(x, conv.weight, conv.bias, padding=1)
            conv_i += 1
        elif name.startswith("relu"):
            x = F.relu(x)
        else:
            x = F.max_pool2d(x, 2) if vgg.pooling == "max" else F.avg_pool2d(x, 2)
        if name in layers:
            out[name] = x
    return out


def image_gradient(forward, image, layers, weights):
    """Features and d(sum of weighted squared features)/d(image)."""
    image = image.clone().requires_grad_(True)
    features = forward(image, layers)
    loss = sum((w * features[name].float().square()).sum() for name, w in zip(layers, weights, strict=True))
    loss.backward()
    return features, image.grad


LAYERS = {
    "vgg19": ["relu1_2", "relu2_2", "relu3_1", "relu3_3", "relu4_2"],  # relu3_4 feeds pool3 but is not returned
    "vgg16": ["relu1_2", "relu2_2", "relu3_1", "relu3_3", "relu4_2"],
}


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("band", [None, 1, 700], ids=["whole", "row-by-row", "bands"])
@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format], ids=["channels-last", "nchw"])
def test_gradient_equals_a_plain_pass(arch, pooling, band, layout, monkeypatch):
    if band is not None:  # a conv's backward pass in bands of rows (1 row, or a few with a partial last band)
        monkeypatch.setattr(lean_backward, "BACKWARD_BAND", band)
    if layout == torch.contiguous_format:  # as on a device without fast channels-last convolutions
        monkeypatch.setattr(vgg_module, "memory_format", lambda device: torch.contiguous_format)
    vgg = tiny_vgg(arch, width=4, pooling=pooling)
    image = smooth_image(37, 42, seed=1)  # odd sizes: pools drop a row and a column
    layers = LAYERS[arch]
    weights = torch.rand(len(layers), generator=torch.Generator().manual_seed(0)).tolist()
    ours, grad = image_gradient(vgg, image, layers, weights)
    reference, reference_grad = image_gradient(lambda i, l: plain_forward(vgg, i, l), image, layers, weights)
    for name in layers:
        assert ours[name].is_contiguous(memory_format=layout), name
        # The two layouts run different convolution kernels, which sum in a different order.
        scale = reference[name].abs().max().item()
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5 * scale)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5 * reference_grad.abs().max().item())


def test_returned_conv_outputs_keep_their_negative_values_and_gradient():
    vgg = tiny_vgg("vgg19", width=4)
    image = smooth_image(32, 32, seed=2)
    layers, weights = ["conv2_1", "relu2_1", "relu3_1"], [1.0, -0.5, 2.0]
    ours, grad = image_gradient(vgg, image, layers, weights)
    reference, reference_grad = image_gradient(
        lambda i, l: plain_forward(vgg, i, [*l, "conv2_1"]), image, layers, weights
    )
    assert (ours["conv2_1"] < 0).any()
    torch.testing.assert_close(ours["conv2_1"].clamp_min(0), ours["relu2_1"])
    torch.testing.assert_close(grad, reference_grad, rtol=1e-5, atol=1e-6 * reference_grad.abs().max().item())


def test_gradient_under_autocast_matches_a_plain_pass():
    # The CUDA path runs the pass under float16 autocast; CPU bfloat16 autocast exercises the same casts.
    vgg = tiny_vgg("vgg16", width=4)
    image = smooth_image(32, 40, seed=4)
    layers, weights = ["relu1_2", "relu3_1"], [1.0, 3.0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, grad = image_gradient(vgg, image, layers, weights)
        _, reference_grad = image_gradient(lambda i, l: plain_forward(vgg, i, l), image, layers, weights)
    _, exact = image_gradient(lambda i, l: plain_forward(vgg, i, l), image, layers, weights)
    assert ours["relu3_1"].dtype == torch.bfloat16 and grad.dtype == torch.float32

    def error(g, against):
        return float((g - against).norm() / against.norm())

    # Element by element the two 16-bit passes round differently (how, depends on the CPU's instructions), so
    # they are compared as whole gradients: close to each other, and as close to float32 as autograd's own.
    assert error(grad, reference_grad) < 0.03
    assert error(grad, exact) < 1.2 * error(reference_grad, exact) + 1e-3


def test_keeps_under_half_of_what_a_plain_pass_keeps():
    vgg = tiny_vgg("vgg19", width=4)
    image = smooth_image(64, 64, seed=5)
    layers = LAYERS["vgg19"]
    ours = saved_bytes(vgg, lambda: vgg(image.clone().requires_grad_(True), layers))
    plain = saved_bytes(vgg, lambda: plain_forward(vgg, image.clone().requires_grad_(True), layers))
    returned = sum(t.numel() * t.element_size() for t in plain_forward(vgg, image, layers).values())
    # A plain pass keeps every conv's input, the ReLU outputs and int64 pool indices; ours keeps the
    # returned activations (the losses hold them anyway) and one byte per other activation.
    assert ours < 0.5 * plain, (ours, plain)
    assert ours < 1.4 * returned, (ours, returned)


def test_no_autograd_no_saving():
    vgg = tiny_vgg("vgg19", width=4)
    image = smooth_image(32, 32, seed=6)
    with torch.no_grad():
        out = vgg(image.requires_grad_(True), ["relu3_1"])
    assert out["relu3_1"].grad_fn is None
    torch.testing.assert_close(out["relu3_1"], plain_forward(vgg, image.detach(), ["relu3_1"])["relu3_1"])


def test_max_pool_sends_the_gradient_where_torch_does_ties_included():
    """Of equal inputs in a window, torch's max pooling takes the first in scan order; so does the lean one."""
    x = torch.randint(0, 3, (1, 3, 9, 11), generator=torch.Generator().manual_seed(0)).float()  # many ties
    x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(1, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    ours = x.clone().requires_grad_(True)
    lean_backward.max_pool(ours).backward(grad)
    reference = x.clone().requires_grad_(True)
    F.max_pool2d(reference, 2).backward(grad)
    torch.testing.assert_close(lean_backward.max_pool(x), F.max_pool2d(x, 2))
    assert torch.equal(ours.grad, reference.grad)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_of_four_gives_torch_max_pooling_values_exactly(layout, dtype):
    """The values-only pooling of passes without autograd: bit for bit F.max_pool2d's, odd sizes (the last row and
    column dropped), negative values and NaN included, in the input's layout."""
    x = torch.randn(2, 5, 9, 13, generator=torch.Generator().manual_seed(2)).to(dtype)
    x[0, 1, 3, 4] = float("nan")
    x = x.contiguous(memory_format=layout)
    ours, torchs = lean_backward.max_of_four(x), F.max_pool2d(x, 2)
    assert ours.shape == (2, 5, 4, 6) and ours.dtype == dtype
    assert torch.equal(ours.isnan(), torchs.isnan()) and ours.isnan().sum() == 1
    assert torch.equal(ours.nan_to_num(), torchs.nan_to_num())
    assert ours.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("arch", ["vgg16", "vgg19"])
def test_a_layers_channels_are_those_of_its_map(arch):
    vgg = tiny_vgg(arch, width=4)
    layers = [name for name in vgg.names if not name.startswith("conv")]
    maps = vgg(smooth_image(64, 64, seed=1), layers)
    assert {name: vgg.channels(name) for name in layers} == {name: maps[name].shape[1] for name in layers}
