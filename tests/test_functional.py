"""Loss functions against direct computations and finite differences."""

import pytest
import torch
import torch.nn.functional as F

from fusion_core import functional as Fn


def test_gram_matches_direct_sum():
    features = torch.randn(2, 5, 6, 7, dtype=torch.float64)
    direct = torch.zeros(2, 5, 5, dtype=torch.float64)
    for b in range(2):
        for i in range(5):
            for j in range(5):
                direct[b, i, j] = (features[b, i] * features[b, j]).sum() / (6 * 7)
    torch.testing.assert_close(Fn.gram_matrix(features), direct)


def test_guided_gram_is_the_gram_of_the_region():
    features = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    mask = torch.zeros(6, 8, dtype=torch.float64)
    mask[:, :3] = 1
    region = features[..., :3]
    torch.testing.assert_close(Fn.gram_matrix(features, mask), Fn.gram_matrix(region))


@pytest.mark.parametrize("masked", [False, True])
def test_gram_gradient_matches_finite_differences_and_autograd(masked):
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=generator).requires_grad_(True)
    mask = torch.rand(4, 5, dtype=torch.float64, generator=generator) if masked else None
    assert torch.autograd.gradcheck(lambda f: Fn.gram_matrix(f, mask), (features,))
    # Against autograd through the plain products, with a loss whose dL/dG is not symmetric.
    probe = torch.randn(2, 3, 3, dtype=torch.float64, generator=generator)
    (grad,) = torch.autograd.grad((Fn.gram_matrix(features, mask) * probe).sum(), features)
    weight = torch.ones(4, 5, dtype=torch.float64) if mask is None else mask
    weighted = (features * weight).flatten(2)
    plain = weighted @ weighted.transpose(1, 2) / weight.square().sum()
    (expected,) = torch.autograd.grad((plain * probe).sum(), features)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("masked", [False, True])
def test_gram_of_a_channels_last_map_equals_and_keeps_its_layout(masked):
    # The VGG pass produces channels-last maps on CPU and CUDA: the Gram reads them in place, and its
    # gradient comes back in the same layout (a layout change in the backward pass would cost a copy).
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(1, 6, 5, 7, dtype=torch.float64, generator=generator)
    mask = torch.rand(5, 7, dtype=torch.float64, generator=generator) if masked else None
    probe = torch.randn(1, 6, 6, dtype=torch.float64, generator=generator)
    results = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        x = features.contiguous(memory_format=layout).requires_grad_(True)
        assert Fn.channels_by_positions(x).untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
        gram = Fn.gram_matrix(x, mask)
        (grad,) = torch.autograd.grad((gram * probe).sum(), x)
        assert grad.is_contiguous(memory_format=layout)
        results[layout] = gram, grad
    torch.testing.assert_close(results[torch.channels_last], results[torch.contiguous_format])


def test_positions_last_and_mrf_targets_in_either_layout():
    generator = torch.Generator().manual_seed(4)
    style = torch.randn(1, 4, 7, 6, dtype=torch.float64, generator=generator)
    indices = torch.randint(0, 20, (30,), generator=generator)
    channels_last = style.contiguous(memory_format=torch.channels_last)
    rows = Fn.positions_last(channels_last)
    torch.testing.assert_close(rows, style[0].reshape(4, -1).T)
    assert rows.untyped_storage().data_ptr() == channels_last.untyped_storage().data_ptr()  # a view, no copy
    ours = Fn.mrf_targets(channels_last, indices, (7, 8), 3, 1)
    plain = Fn.mrf_targets(style, indices, (7, 8), 3, 1)
    assert ours[1].is_contiguous(memory_format=torch.channels_last) and plain[1].is_contiguous()
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b)


def test_content_and_mrf_gradients_keep_the_channels_last_layout():
    # A channels-first gradient meeting the VGG pass's channels-last ones costs a layout copy at every sum.
    generator = torch.Generator().manual_seed(5)
    features = torch.randn(1, 4, 7, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    target = torch.randn(1, 4, 7, 8, generator=generator).contiguous(memory_format=torch.channels_last)
    style = torch.randn(1, 4, 6, 6, generator=generator).contiguous(memory_format=torch.channels_last)
    targets = Fn.mrf_targets(style, torch.randint(0, 16, (30,), generator=generator), (7, 8), 3, 1)
    for loss in (lambda f: Fn.content_loss(f, target, 0.5), lambda f: Fn.mrf_loss(f, *targets)):
        x = features.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss(x), x)
        assert grad.is_contiguous(memory_format=torch.channels_last) and not grad.is_contiguous()
        y = features.contiguous().requires_grad_(True)
        (reference,) = torch.autograd.grad(loss(y), y)  # the same values from a channels-first map
        torch.testing.assert_close(grad, reference)


def test_patches_are_unfold_rows_in_grid_order():
    features = torch.randn(1, 3, 9, 7)
    full = Fn.patches(features, 3, 2)
    rows, cols = Fn.patch_grid(9, 7, 3, 2)
    assert full.shape == (rows * cols, 27)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        torch.testing.assert_close(full[i], features[0, :, r * 2 : r * 2 + 3, c * 2 : c * 2 + 3].reshape(-1))
    torch.testing.assert_close(Fn.patches(features, 3, 2, slice(1, 3)), full[cols : 3 * cols])
    torch.testing.assert_close(Fn.patch_norms(features, 3, 2), full.norm(dim=1))


def direct_mrf(features, style, indices, size, stride, weights=None):
    out_patches = F.unfold(features, size, stride=stride)[0].T
    style_patches = F.unfold(style, size, stride=stride)[0].T
    w = torch.ones(len(indices), dtype=features.dtype) if weights is None else weights
    return (w[:, None] * (out_patches - style_patches[indices]).square()).sum()


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_mrf_loss_equals_the_patch_sum(stride, weighted):
    torch.manual_seed(0)
    features = torch.randn(1, 4, 8, 9, dtype=torch.float64)
    style = torch.randn(1, 4, 7, 6, dtype=torch.float64)
    rows, cols = Fn.patch_grid(8, 9, 3, stride)
    s_rows, s_cols = Fn.patch_grid(7, 6, 3, stride)
    indices = torch.randint(0, s_rows * s_cols, (rows * cols,))
    weights = torch.rand(rows * cols, dtype=torch.float64) if weighted else None
    targets = Fn.mrf_targets(style, indices, (8, 9), 3, stride, weights)
    torch.testing.assert_close(
        Fn.mrf_loss(features, *targets), direct_mrf(features, style, indices, 3, stride, weights)
    )


def test_mrf_loss_gradient_matches_finite_differences():
    torch.manual_seed(1)
    style = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    indices = torch.randint(0, 16, (16,))
    targets = Fn.mrf_targets(style, indices, (6, 6), 3, 1, torch.rand(16, dtype=torch.float64))
    features = torch.randn(1, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: Fn.mrf_loss(f, *targets), (features,))


def test_gram_and_content_gradients_match_finite_differences():
    torch.manual_seed(2)
    target_gram = Fn.gram_matrix(torch.randn(1, 3, 5, 5, dtype=torch.float64))
    target = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    mask = torch.rand(5, 5, dtype=torch.float64)
    features = torch.randn(1, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f: Fn.gram_loss(f, target_gram, mask), (features,))
    assert torch.autograd.gradcheck(lambda f: Fn.content_loss(f, target, 0.7), (features,))
    assert torch.autograd.gradcheck(Fn.total_variation_loss, (features,))


def test_content_loss_is_mean_squared_distance_in_energy_units():
    a, b = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    torch.testing.assert_close(Fn.content_loss(a, b, 2.0), ((a - b) ** 2).sum() / a.numel() / 2.0)


def test_positions_last_gives_contiguous_rows_in_either_layout():
    features = torch.randn(1, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    expected = features[0].reshape(5, -1).T  # row p = the C values at position p
    for layout in (torch.contiguous_format, torch.channels_last):
        rows = Fn.positions_last(features.contiguous(memory_format=layout))
        assert rows.is_contiguous() and torch.equal(rows, expected)
    channels_last = features.contiguous(memory_format=torch.channels_last)
    assert Fn.positions_last(channels_last).data_ptr() == channels_last.data_ptr()  # a view: no copy
