"""User controls: masks, colour modes, several styles with blend weights, style scale, optimiser choice."""

from dataclasses import replace

import pytest
import torch
from helpers import IMAGES, SHARED_DATA, TRAINED_VGG16, smooth_image

from fusion_core import GlobalStyle, LocalStyle, Settings, load_image, load_vgg
from fusion_core.colour import colour_map, colour_statistics, match_histogram, recolour, rgb_to_yiq
from fusion_core.functional import gram_matrix, patch_grid
from fusion_core.images import mirror_pad, resize, resize_mask
from fusion_core.losses import PatchLoss
from fusion_core.stylize import starting_image, stylize
from fusion_core.targets import build_criterion


def right_half(height, width):
    mask = torch.zeros(height, width)
    mask[:, width // 2 :] = 1
    return mask


def patch_losses(criterion) -> list[PatchLoss]:
    return [module for _, _, module in criterion.terms if isinstance(module, PatchLoss)]


def colour_stats(image, weight=None):
    """Mean and covariance of the pixels' RGB values (weighted by ``weight``), in float64."""
    pixels = image[0].reshape(3, -1).double()
    w = torch.ones(pixels.shape[1], dtype=torch.float64) if weight is None else weight.reshape(-1).double()
    w = w / w.sum()
    mean = (pixels * w).sum(1)
    centred = pixels - mean[:, None]
    return mean, (centred * w) @ centred.T


def gradient_of(criterion, kind, image):
    x = image.clone().requires_grad_(True)
    criterion(x, rematch=True)[kind].backward()
    return x.grad


@pytest.mark.parametrize(
    ("term", "kind", "margin"),
    [
        (lambda s, m: GlobalStyle(s, layers=("relu1_2", "relu2_1"), target_mask=m), "global", 12),
        (lambda s, m: LocalStyle(s, layer="relu2_1", target_mask=m), "local", 12),
    ],
)
def test_a_zero_mask_region_receives_no_gradient(vgg, content, style, term, kind, margin):
    mask = right_half(48, 64)
    criterion = build_criterion(vgg, content, [term(style, mask)], Settings(size=64, content_weight=0), (48, 64))
    grad = gradient_of(criterion, kind, smooth_image(48, 64, seed=5))
    outside = grad[..., : 32 - margin]  # beyond the receptive field of anything inside the region
    inside = grad[..., 32:]
    assert torch.count_nonzero(outside) == 0
    assert inside.abs().sum() > 0
    unmasked = build_criterion(vgg, content, [term(style, None)], Settings(size=64, content_weight=0), (48, 64))
    assert torch.count_nonzero(gradient_of(unmasked, kind, smooth_image(48, 64, seed=5))[..., : 32 - margin]) > 0


def test_patch_matches_come_only_from_the_style_region(vgg, content, style):
    style_mask = torch.zeros(56, 56)
    style_mask[:20] = 1  # top band of the style image
    shape = (48, 64)
    criterion = build_criterion(
        vgg,
        content,
        [LocalStyle(style, style_mask=style_mask, target_mask=right_half(*shape))],
        Settings(size=64),
        shape,
    )
    criterion(smooth_image(*shape, seed=6), rematch=True)
    loss = patch_losses(criterion)[0]
    rows, cols = patch_grid(*loss.style.shape[-2:], 3, 1)
    mask_at_layer = resize_mask(style_mask, tuple(loss.style.shape[-2:]))
    centre_values = mask_at_layer[loss.indices // cols + 1, loss.indices % cols + 1]
    assert (centre_values >= 0.5).all()
    free = build_criterion(vgg, content, [LocalStyle(style)], Settings(size=64), shape)
    free(smooth_image(*shape, seed=6), rematch=True)
    free_rows = patch_losses(free)[0].indices // cols
    assert (free_rows + 1 >= 6).any(), "without a style mask some matches lie outside the band"


def test_blend_weights_one_to_zero_reproduce_the_single_style_result(vgg, content, style, other_style):
    settings = Settings(final_iterations=0, size=48, levels=2, iterations=5, seed=3)
    single = stylize(vgg, content, [GlobalStyle(style), LocalStyle(style)], settings)
    blended = stylize(
        vgg,
        content,
        [
            GlobalStyle(style, weight=20 * 1.0),
            LocalStyle(style, weight=2.5e-5 * 1.0),
            GlobalStyle(other_style, weight=20 * 0.0),
            LocalStyle(other_style, weight=2.5e-5 * 0.0),
        ],
        settings,
    )
    assert torch.equal(single, blended)
    other = stylize(
        vgg, content, [GlobalStyle(style, weight=10), GlobalStyle(other_style, weight=10), LocalStyle(style)], settings
    )
    assert not torch.equal(single, other)


def test_luminance_only_output_keeps_the_content_chroma(vgg, content, style):
    out = stylize(
        vgg,
        content,
        [GlobalStyle(style), LocalStyle(style)],
        Settings(final_iterations=0, size=48, levels=2, iterations=5, color="luminance"),
    )
    expected = rgb_to_yiq(resize(content, tuple(out.shape[-2:])))[:, 1:]
    difference = (rgb_to_yiq(out)[:, 1:] - expected).abs().amax(1)
    unclipped = ((out > 0) & (out < 1)).all(1)  # clipping to 0..1 may move chroma, nothing else may
    assert unclipped.float().mean() > 0.5
    assert difference[unclipped].max() < 1e-5
    plain = stylize(
        vgg,
        content,
        [GlobalStyle(style), LocalStyle(style)],
        Settings(final_iterations=0, size=48, levels=2, iterations=5),
    )
    assert (rgb_to_yiq(plain)[:, 1:] - expected).abs().amax(1)[unclipped].mean() > 1e-2


def test_histogram_matching_gives_the_style_the_content_colour_statistics(content, style):
    matched = match_histogram(style.double(), content.double())

    def stats(image):
        pixels = image[0].reshape(3, -1)
        return pixels.mean(1), torch.cov(pixels, correction=0)

    (mean_m, cov_m), (mean_c, cov_c), (mean_s, _) = stats(matched), stats(content.double()), stats(style.double())
    torch.testing.assert_close(mean_m, mean_c, rtol=0, atol=1e-10)
    torch.testing.assert_close(cov_m, cov_c, rtol=1e-8, atol=1e-10)
    assert (mean_s - mean_c).abs().max() > 1e-3  # it really changed something


def test_histogram_mode_stylises_with_the_styles_recoloured_to_the_content_colours(vgg, content, style):
    settings = Settings(final_iterations=0, size=48, levels=1, iterations=3)
    out = stylize(vgg, content, [GlobalStyle(style)], replace(settings, color="histogram"))
    # The same as recolouring the style by hand (its colour statistics are the content's, as tested above) and
    # stylising without a colour mode ...
    by_hand = stylize(vgg, content, [GlobalStyle(match_histogram(style, content))], settings)
    torch.testing.assert_close(out, by_hand)
    # ... which leaves the result in the content's colours, where the style's own colours would move it.
    plain = stylize(vgg, content, [GlobalStyle(style)], settings)
    target_mean, target_cov = colour_stats(resize(content, tuple(out.shape[-2:])))

    def colour_distance(image):
        mean, cov = colour_stats(image)
        return float((mean - target_mean).norm() + (cov - target_cov).norm())

    assert colour_distance(out) < 0.1 * colour_distance(plain)


def test_style_scale_sets_the_style_size_relative_to_the_output(vgg, content, style):
    shape = (48, 64)
    sizes = {}
    for scale in (0.5, 1.0, 2.0):
        criterion = build_criterion(vgg, content, [LocalStyle(style, layer="relu1_1", scale=scale)], Settings(), shape)
        sizes[scale] = tuple(patch_losses(criterion)[0].style.shape[-2:])
    assert sizes == {0.5: (32, 32), 1.0: (64, 64), 2.0: (128, 128)}


def test_adam_and_total_variation(vgg, content, style):
    reports = []
    out = stylize(
        vgg,
        content,
        [GlobalStyle(style), LocalStyle(style)],
        Settings(
            final_iterations=0, size=48, levels=1, iterations=30, optimizer="adam", learning_rate=0.05, tv_weight=5.0
        ),
        on_progress=reports.append,
    )
    assert "tv" in reports[0].losses
    assert reports[-1].losses["total"] < reports[0].losses["total"]
    assert out.min() >= 0 and out.max() <= 1


@SHARED_DATA
def test_two_styles_in_two_regions_follow_their_own_style():
    vgg = load_vgg(TRAINED_VGG16)
    content = load_image(IMAGES / "chelsea.png")
    blue = load_image(IMAGES / "starry_night.jpg")
    bright = load_image(IMAGES / "woman-with-hat-matisse.jpg")
    settings = Settings(final_iterations=0, size=96, levels=2, iterations=20)
    height, width = 64, 96
    right = right_half(height, width)
    left = 1 - right
    out = stylize(
        vgg,
        content,
        [
            GlobalStyle(blue, target_mask=left),
            LocalStyle(blue, target_mask=left),
            GlobalStyle(bright, target_mask=right),
            LocalStyle(bright, target_mask=right),
        ],
        settings,
    )
    # Per-region (guided) Gram distance to each style, averaged over the global loss's layers.
    distance = {}
    for layer in GlobalStyle(blue).layers:
        features = vgg(out, [layer])[layer]
        for region_name, mask in (("left", left), ("right", right)):
            region = resize_mask(mask, tuple(features.shape[-2:]))
            for style_name, image in (("blue", blue), ("bright", bright)):
                target = gram_matrix(vgg(resize(image, (height, width)), [layer])[layer])
                d = float((gram_matrix(features, region) - target).norm() / target.norm())
                distance[region_name, style_name] = distance.get((region_name, style_name), 0) + d / 4
    assert distance["left", "blue"] < distance["left", "bright"]
    assert distance["right", "bright"] < distance["right", "blue"]


# --- the default start: the content in the style's colours ---


def test_colour_map_is_the_least_moving_map_between_the_colour_statistics(content, style):
    source, target = colour_stats(content), colour_stats(style)
    transform, offset = colour_map((source[0][:, None], source[1]), (target[0][:, None], target[1]))  # content -> style
    # It gives the target's mean and covariance exactly ...
    mapped = transform @ content[0].reshape(3, -1).double() + offset
    torch.testing.assert_close(mapped.mean(1), target[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cov(mapped, correction=0), target[1], rtol=1e-8, atol=1e-12)
    # ... and, as the Monge-Kantorovich map, is symmetric positive definite (any other linear map with these
    # statistics is this one times a rotation, which moves colours further).
    torch.testing.assert_close(transform, transform.T, rtol=0, atol=1e-10)
    assert torch.linalg.eigvalsh(transform).min() > 0
    rotation = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.3, 0.1], [0.3, 0.0, -0.2], [-0.1, 0.2, 0.0]]).double())
    rotated = (
        transform @ torch.linalg.cholesky(source[1]) @ rotation @ torch.linalg.inv(torch.linalg.cholesky(source[1]))
    )
    pixels = content[0].reshape(3, -1).double()

    def moved(a):
        return ((a @ (pixels - source[0][:, None]) + target[0][:, None]) - pixels).square().sum(0).mean()

    torch.testing.assert_close(torch.cov(rotated @ pixels, correction=0), target[1], rtol=1e-8, atol=1e-12)
    assert moved(transform) < moved(rotated)


def test_recolour_gives_each_region_its_style_colours_and_keeps_uncovered_pixels():
    content = smooth_image(40, 60, seed=21) * 0.6 + 0.2
    red, blue = torch.zeros(1, 3, 30, 30), torch.zeros(1, 3, 30, 30)
    red[:, 0] = torch.linspace(0.5, 0.9, 30)[None, :]  # reds, varying in one direction only
    blue[:, 2] = torch.linspace(0.4, 0.8, 30)[:, None]
    left = torch.zeros(40, 60)
    left[:, :20] = 1
    right = torch.zeros(40, 60)
    right[:, 40:] = 1
    out = recolour(content, [(red, 1.0, left, None), (blue, 3.0, right, None)])
    # Where one style applies, its colour statistics, computed over that region of the content.
    for region, style in ((left, red), (right, blue)):
        expected = colour_map(colour_statistics(content, region), colour_statistics(style))
        inside = region.bool()
        mapped = (expected[0] @ content[0].reshape(3, -1).double() + expected[1]).clamp(0, 1).reshape(3, 40, 60)
        torch.testing.assert_close(out[0][:, inside].double(), mapped[:, inside], rtol=0, atol=1e-6)
    # The middle third is covered by no mask: the content's own colours.
    torch.testing.assert_close(out[..., 20:40], content[..., 20:40], rtol=0, atol=0)
    # Blend weights matter only where masks overlap: there the heavier style dominates.
    both = recolour(content, [(red, 1.0, None, None), (blue, 3.0, None, None)])
    assert float(both[:, 2].mean()) > float(both[:, 0].mean())


def test_recolour_takes_colours_only_from_the_style_mask():
    content = smooth_image(32, 32, seed=5)
    style = torch.zeros(1, 3, 32, 32)
    style[..., :16] = torch.tensor([0.9, 0.1, 0.1]).view(1, 3, 1, 1)  # red left half
    style[..., 16:] = torch.tensor([0.1, 0.1, 0.9]).view(1, 3, 1, 1)  # blue right half
    style = style + 0.05 * smooth_image(32, 32, seed=6)
    only_blue = torch.zeros(32, 32)
    only_blue[:, 16:] = 1
    out = recolour(content, [(style, 1.0, None, only_blue)])
    mean = out[0].reshape(3, -1).mean(1)
    assert mean[2] > 0.8 and mean[0] < 0.2


def test_the_default_start_is_the_recoloured_content_and_random_is_noise(vgg, content, style, other_style):
    terms = [GlobalStyle(style), LocalStyle(style)]
    start = starting_image(content, terms, "recolored")
    torch.testing.assert_close(start, recolour(content, [(style, 2.0, None, None)]))
    assert starting_image(content, terms, "content") is content
    assert starting_image(content, terms, "random") is None
    # A term's weight counts relative to its kind's default: a2 = 2.5e-5 weighs as much as a1 = 20.
    mixed = starting_image(content, [GlobalStyle(style), LocalStyle(other_style)], "recolored")
    torch.testing.assert_close(mixed, recolour(content, [(style, 1.0, None, None), (other_style, 1.0, None, None)]))
    # The first level starts from it, at the level's size; each later level from the one before (carry_up).
    seen = []
    stylize(
        vgg,
        content,
        terms,
        Settings(final_iterations=0, size=64, levels=2, iterations=2),
        on_level=lambda level, criterion, canvas: seen.append(canvas.clone()),
    )
    # Each level is optimised with a mirrored margin of 4 px (border_margin) around it.
    torch.testing.assert_close(seen[0], mirror_pad(resize(start, (24, 32)), 4))
    assert seen[1].shape == (1, 3, 48 + 8, 64 + 8)
