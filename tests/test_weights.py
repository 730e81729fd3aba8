"""Weight files: every format and convention gives the same features; bad files are refused clearly."""

import functools
import hashlib
import http.server
import pickle
import threading
from pathlib import Path

import pytest
import torch
from helpers import TRAINED_VGG16, smooth_image, tiny_vgg
from safetensors.torch import save_file

from fusion_core import FusionError, load_vgg, vgg_from_state_dict
from fusion_core.vgg import BLOCKS
from fusion_core.weights import VGG19_FILENAME, download_vgg19, read_state_dict, torchvision_conv_indices

LAYERS = ["relu1_1", "relu2_2", "relu3_1", "relu4_2"]


def state_dict_of(vgg, prefix="features."):
    indices = torchvision_conv_indices(vgg.arch)
    state = {}
    for i, conv in zip(indices, vgg.convs, strict=True):
        state[f"{prefix}{i}.weight"] = conv.weight.detach().clone()
        state[f"{prefix}{i}.bias"] = conv.bias.detach().clone()
    return state


def features(vgg, image):
    return vgg(image, LAYERS)


def assert_same_features(a, b, image, **tol):
    fa, fb = features(a, image), features(b, image)
    for layer in LAYERS:
        torch.testing.assert_close(fa[layer], fb[layer], **tol)


@pytest.fixture(scope="module")
def reference():
    return tiny_vgg("vgg19", width=4)


@pytest.fixture(scope="module")
def image():
    return smooth_image(40, 48, seed=3)


def test_formats_load_identical_features(tmp_path, reference, image):
    features_only = state_dict_of(reference)
    full = {**features_only, "classifier.0.weight": torch.randn(8, 4), "classifier.0.bias": torch.randn(8)}
    save_file(features_only, tmp_path / "a.safetensors")
    torch.save(full, tmp_path / "full.pth")
    torch.save(features_only, tmp_path / "features.pt")
    torch.save({k.removeprefix("features."): v for k, v in features_only.items()}, tmp_path / "bare.pth")
    for name in ("a.safetensors", "full.pth", "features.pt", "bare.pth"):
        loaded = load_vgg(tmp_path / name)
        assert loaded.arch == "vgg19" and loaded.convention == "torchvision"
        assert_same_features(reference, loaded, image, rtol=0, atol=0)


def test_half_precision_files_are_cast_to_float32(tmp_path, reference, image):
    half = {k: v.half() for k, v in state_dict_of(reference).items()}
    save_file(half, tmp_path / "half.safetensors")
    save_file({k: v.bfloat16() for k, v in half.items()}, tmp_path / "bf16.safetensors")
    expected = vgg_from_state_dict({k: v.float() for k, v in half.items()})
    loaded = load_vgg(tmp_path / "half.safetensors")
    assert all(c.weight.dtype == torch.float32 for c in loaded.convs)
    assert_same_features(expected, loaded, image, rtol=0, atol=0)
    assert load_vgg(tmp_path / "bf16.safetensors").convs[0].weight.dtype == torch.float32


def test_vgg16_and_vgg19_are_told_by_their_keys(tmp_path):
    for arch in ("vgg16", "vgg19"):
        save_file(state_dict_of(tiny_vgg(arch)), tmp_path / f"{arch}.safetensors")
        vgg = load_vgg(tmp_path / f"{arch}.safetensors")
        assert vgg.arch == arch and len(vgg.convs) == sum(BLOCKS[arch])
    assert "relu3_4" in load_vgg(tmp_path / "vgg19.safetensors").names
    assert "relu3_4" not in load_vgg(tmp_path / "vgg16.safetensors").names


def caffe_equivalent(state):
    """Fold torchvision's input normalisation into the first conv so the net reads Caffe input."""
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    caffe_mean_bgr = torch.tensor([103.939, 116.779, 123.68])
    weight, bias = state["features.0.weight"], state["features.0.bias"]
    rgb_weight = weight / (255.0 * std.view(1, 3, 1, 1))
    offset = ((caffe_mean_bgr.flip(0) / 255.0 - mean) / std).view(1, 3, 1, 1)
    new = dict(state)
    new["features.0.weight"] = rgb_weight.flip(1)  # Caffe input channels are BGR
    new["features.0.bias"] = bias + (weight * offset).sum((1, 2, 3))
    return new


def test_caffe_convention_matches_torchvision_and_is_read_from_metadata(tmp_path, reference, image):
    caffe_state = caffe_equivalent(state_dict_of(reference))
    save_file(caffe_state, tmp_path / "caffe.safetensors", metadata={"convention": "caffe: BGR, 0..255"})
    caffe = load_vgg(tmp_path / "caffe.safetensors")
    assert caffe.convention == "caffe"
    # Zero padding differs between the conventions, so compare away from the border.
    a, b = reference(image, ["relu1_1"])["relu1_1"], caffe(image, ["relu1_1"])["relu1_1"]
    torch.testing.assert_close(a[..., 1:-1, 1:-1], b[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)
    explicit = load_vgg(tmp_path / "caffe.safetensors", convention="torchvision")
    assert explicit.convention == "torchvision"
    assert not torch.allclose(explicit(image, ["relu1_1"])["relu1_1"], b)


def test_trained_vgg16_metadata_says_caffe():
    if not TRAINED_VGG16.is_file():
        pytest.skip(f"trained weights not found at {TRAINED_VGG16}")
    vgg = load_vgg(TRAINED_VGG16)
    assert (vgg.arch, vgg.convention) == ("vgg16", "caffe")


def test_tapped_activations_are_not_overwritten_in_place(reference, image):
    both = reference(image, ["conv1_1", "relu1_1", "conv2_1"])
    assert (both["conv1_1"] < 0).any(), "conv1_1 was clobbered by the in-place ReLU"
    torch.testing.assert_close(both["relu1_1"], both["conv1_1"].clamp_min(0))
    alone = reference(image, ["conv2_1"])["conv2_1"]
    torch.testing.assert_close(alone, both["conv2_1"])


def test_network_runs_only_to_the_deepest_layer(reference, image):
    calls = []
    hooks = [conv.register_forward_hook(lambda *a: calls.append(1)) for conv in reference.convs]
    try:
        reference(image, ["relu2_1"])
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) == 3  # conv1_1, conv1_2, conv2_1


def test_avg_pooling_option(reference, image, tmp_path):
    save_file(state_dict_of(reference), tmp_path / "w.safetensors")
    avg = load_vgg(tmp_path / "w.safetensors", pooling="avg")
    relu = reference(image, ["relu1_2"])["relu1_2"]
    torch.testing.assert_close(avg(image, ["pool1"])["pool1"], torch.nn.functional.avg_pool2d(relu, 2))


# --- bad files ---------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FusionError, match="weights: file not found"):
        load_vgg(tmp_path / "nope.safetensors")


def test_wrong_architecture(tmp_path):
    resnet_like = {"conv1.weight": torch.randn(64, 3, 7, 7), "fc.weight": torch.randn(10, 64)}
    save_file(resnet_like, tmp_path / "resnet.safetensors")
    with pytest.raises(FusionError, match="expected torchvision VGG16/VGG19"):
        load_vgg(tmp_path / "resnet.safetensors")
    state = state_dict_of(tiny_vgg("vgg19"))
    del state["features.34.weight"], state["features.34.bias"]  # 15 convs: no known VGG
    save_file(state, tmp_path / "vgg15.safetensors")
    with pytest.raises(FusionError, match="expected torchvision VGG16"):
        load_vgg(tmp_path / "vgg15.safetensors")
    bn = {**state_dict_of(tiny_vgg("vgg16")), "features.1.running_mean": torch.zeros(4)}
    save_file(bn, tmp_path / "bn.safetensors")
    with pytest.raises(FusionError, match="batch-norm"):
        load_vgg(tmp_path / "bn.safetensors")


def test_truncated_and_corrupt_files(tmp_path, reference):
    save_file(state_dict_of(reference), tmp_path / "w.safetensors")
    torch.save(state_dict_of(reference), tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(FusionError, match="truncated or corrupt|not a readable safetensors"):
            load_vgg(tmp_path / f"cut_{name}")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(FusionError, match=r"junk\.pth"):
        load_vgg(tmp_path / "junk.pth")


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned > pwned.txt",))


def test_pickled_code_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"features.0.weight": torch.zeros(1), "payload": _RunsCode()}, tmp_path / "evil.pth")
    with open(tmp_path / "evil_plain.pth", "wb") as f:
        pickle.dump(_RunsCode(), f)
    for name in ("evil.pth", "evil_plain.pth"):
        with pytest.raises(FusionError, match="refused|truncated or corrupt"):
            load_vgg(tmp_path / name)
    assert not (tmp_path / "pwned.txt").exists()


def test_unsupported_extension(tmp_path):
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(FusionError, match=r"accepted: \.safetensors, \.pth, \.pt"):
        read_state_dict(tmp_path / "w.onnx")


# --- download ---------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tmp_path):
    """A full torchvision-style VGG19 checkpoint (tiny widths) and its SHA-256."""
    full = {**state_dict_of(tiny_vgg("vgg19")), "classifier.0.weight": torch.randn(4, 4)}
    path = tmp_path / "served" / "vgg19-test.pth"
    path.parent.mkdir()
    torch.save(full, path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def test_download_from_file_url_keeps_features_only_safetensors(tmp_path, checkpoint, image):
    path, sha = checkpoint
    seen = []
    target = download_vgg19(tmp_path / "models", url=path.as_uri(), sha256=sha, progress=lambda d, t: seen.append(d))
    assert target == tmp_path / "models" / VGG19_FILENAME
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [VGG19_FILENAME]  # no leftovers
    state, metadata = read_state_dict(target)
    assert all(k.startswith("features.") for k in state) and metadata["convention"] == "torchvision"
    assert seen and seen[-1] == path.stat().st_size
    assert_same_features(load_vgg(path), load_vgg(target), image, rtol=0, atol=0)


def test_vgg19_name_finds_the_kept_copy_without_downloading(tmp_path, checkpoint):
    path, sha = checkpoint
    download_vgg19(tmp_path, url=path.as_uri(), sha256=sha)
    path.unlink()
    assert load_vgg("vgg19", models_dirs=[tmp_path], download=False).arch == "vgg19"


def test_download_over_http_from_a_local_server(tmp_path, checkpoint):
    path, sha = checkpoint
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(path.parent))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{path.name}"
        totals = []
        target = download_vgg19(tmp_path / "m", url=url, sha256=sha, progress=lambda d, t: totals.append(t))
    finally:
        server.shutdown()
    assert target.is_file() and totals[-1] == path.stat().st_size


def test_sha256_mismatch_deletes_the_download(tmp_path, checkpoint):
    path, _ = checkpoint
    with pytest.raises(FusionError, match="SHA-256 .* expected 0+; the file was deleted"):
        download_vgg19(tmp_path / "m", url=path.as_uri(), sha256="0" * 64)
    assert list((tmp_path / "m").iterdir()) == []


def test_interrupted_download_leaves_no_model_file(tmp_path, checkpoint, monkeypatch):
    path, sha = checkpoint

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_vgg19(tmp_path / "m", url=path.as_uri(), sha256=sha, progress=interrupt)
    assert list((tmp_path / "m").iterdir()) == []


def test_no_network_gives_a_clear_error(tmp_path):
    with pytest.raises(FusionError, match=f"could not download .*put it .*{VGG19_FILENAME}.* in {tmp_path}"):
        download_vgg19(tmp_path, url="http://127.0.0.1:9/vgg19.pth", sha256="0" * 64)
    with pytest.raises(FusionError, match="vgg19 not found; put vgg19.safetensors"):
        load_vgg("vgg19", models_dirs=[tmp_path], download=False)
    assert not any(Path(tmp_path).iterdir())
