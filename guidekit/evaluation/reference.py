"""Reference statistics: the mean, covariance (and optionally the features) of a real image set.

File layout (``.npz``, readable with ``np.load(path)`` and no pickle):

``mu``
    ``(D,)`` float64 mean of the features.
``sigma``
    ``(D, D)`` float64 unbiased covariance (``np.cov``, ``ddof=1``).
``features``
    optional ``(N, D)`` float32 features, one row per reference image in file order; precision/recall,
    density/coverage and KID need them, FID does not.
``identity``
    optional 0-d unicode array holding the JSON of the feature network's
    :meth:`~guidekit.evaluation.features.FeatureNetwork.identity` (name, dimension, preprocessing, weights hash).
``source``
    optional 0-d unicode array holding the JSON of where the images came from: ``kind`` (``default``, ``folder``,
    ``npz`` or ``statistics``), ``path`` and ``images`` (how many; ``None`` when only statistics were copied).

``mu`` and ``sigma`` are the names ADM's evaluator, pytorch-fid and clean-fid use, so their statistics files
load as they are (without ``identity``: the network cannot be checked). :func:`load_reference` also accepts a
file with ``features`` only (the statistics are then computed from them) and, given a network, a file with
only ADM's ``arr_0`` images (uint8 NHWC), whose features it computes. Other keys (ADM's ``mu_s``, ``sigma_s``,
``arr_1`` labels) are ignored. Statistics are accumulated in float64
(:class:`~guidekit.evaluation.stats.RunningStatistics`).

:func:`reference_from_source` builds a reference from what ``guidekit reference --from`` names: ``default`` (the
embedded default model's held-out images, :data:`DEFAULT_HELD_OUT`), an image folder, or an ``.npz`` file.
"""

from __future__ import annotations

import json
import os
import secrets
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from guidekit.evaluation.features import FeatureNetwork
from guidekit.evaluation.stats import RunningStatistics
from guidekit.validation import check_int

__all__ = [
    "DEFAULT_HELD_OUT",
    "DEFAULT_SOURCE",
    "IMAGE_EXTENSIONS",
    "ReferenceStatistics",
    "load_reference",
    "reference_from_folder",
    "reference_from_npz_images",
    "reference_from_source",
    "save_reference",
]

#: File name endings :func:`reference_from_folder` reads (case-insensitive).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
#: Identity entries that must agree between a reference file and the network it is used with.
_CHECKED_IDENTITY = ("name", "dim", "preprocessing", "sha256")
#: The source name of the embedded default model's held-out images.
DEFAULT_SOURCE = "default"
#: The embedded default model's held-out images (360 coloured 8x8 digits) in ADM's batch layout: ``arr_0`` uint8
#: NHWC images, ``arr_1`` their labels; written by scripts/model_card.py, whose FID column is measured against them.
DEFAULT_HELD_OUT = Path(__file__).resolve().parents[1] / "app" / "default_model" / "held_out.npz"


@dataclass
class ReferenceStatistics:
    """Gaussian statistics of reference features: ``mu`` ``(D,)``, ``sigma`` ``(D, D)`` (float64), optional
    ``features`` ``(N, D)`` (float32), the ``identity`` of the network that made them and the ``source`` of the
    images (each None if unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    features: np.ndarray | None = None
    identity: dict[str, Any] | None = None
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (len(self.mu), len(self.mu)) or len(self.mu) == 0:
            raise ValueError(f"mu of shape {self.mu.shape} and sigma of shape {self.sigma.shape} are not accepted; "
                             "expected (D,) and (D, D) with D >= 1")
        for key, value in (("mu", self.mu), ("sigma", self.sigma)):
            if not np.isfinite(value).all():
                raise ValueError(f"{key} holding NaN or infinite values is not accepted; expected finite values")
        if self.features is not None:
            self.features = np.asarray(self.features, dtype=np.float32)
            if self.features.ndim != 2 or self.features.shape[1] != self.dim:
                raise ValueError(f"features of shape {self.features.shape} are not accepted; expected (N, {self.dim})")
            if not np.isfinite(self.features).all():
                raise ValueError("features holding NaN or infinite values are not accepted; expected finite values")
        for key, value in (("identity", self.identity), ("source", self.source)):
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{key} of type {type(value).__name__} is not accepted; expected a dict")

    @property
    def dim(self) -> int:
        """Feature dimension ``D``."""
        return len(self.mu)

    @classmethod
    def from_features(cls, features: Any, identity: dict[str, Any] | None = None, *, keep_features: bool = True,
                      source: dict[str, Any] | None = None) -> ReferenceStatistics:
        """Statistics of ``features`` ``(N, D)`` (N >= 2), keeping the features unless ``keep_features=False``."""
        array = np.asarray(features, dtype=np.float32)
        if array.ndim != 2 or len(array) < 2:
            raise ValueError(f"features of shape {array.shape} are not accepted; expected (N, D) with N >= 2")
        stats = RunningStatistics(array.shape[1]).update(array)
        return cls(stats.mean, stats.covariance, array if keep_features else None, identity, source)


def _open_npz(path: str | Path, what: str) -> tuple[Path, Any]:
    """``(path, NpzFile)``, with clear errors for a missing or unreadable file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{what}={str(path)!r} is not accepted; no such file (expected an .npz file)")
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{what}={str(path)!r} is not accepted; it is not a readable .npz archive ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{what}={str(path)!r} is not accepted; it holds a single array (.npy), expected an .npz "
                         "archive with mu and sigma, features, or arr_0")
    return file, archive


def _read(archive: Any, key: str, path: Path) -> np.ndarray:
    try:
        return archive[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"reference file {str(path)!r} is not accepted; its array {key!r} is corrupt ({exc})") from exc


def _parse_json(archive: Any, key: str, path: Path) -> dict[str, Any] | None:
    """The JSON object stored as the 0-d string ``key`` (``identity``, ``source``), or None if absent."""
    if key not in archive.files:
        return None
    raw = _read(archive, key, path)
    try:
        value = json.loads(str(raw[()]))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"reference file {str(path)!r} is not accepted; its {key} entry is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"reference file {str(path)!r} is not accepted; its {key} entry is not a JSON object")
    return value


def _images(archive: Any, path: Path) -> np.ndarray:
    images = _read(archive, "arr_0", path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) < 2:
        raise ValueError(f"arr_0 of {str(path)!r} with dtype {images.dtype} and shape {images.shape} is not "
                         "accepted; expected uint8 images (N, H, W, 3) with N >= 2 (ADM's sample-batch layout)")
    return images


def load_reference(path: str | Path, expected_dim: int | None = None, *, network: FeatureNetwork | None = None,
                   batch_size: int = 256) -> ReferenceStatistics:
    """Read reference statistics from an ``.npz`` file (layout in the module docstring).

    Priority: stored ``mu``/``sigma`` (with ``features`` if present); else ``features`` (statistics computed
    from them); else ``arr_0`` images, whose features ``network`` computes (``batch_size`` images at a time).
    ``expected_dim`` (default: ``network.dim``) is checked against the file. With ``network``, a file whose
    identity disagrees with the network's in name, dim, preprocessing or weights hash (``sha256``) raises.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an .npz archive, a corrupt array, missing keys, wrong shapes, a dimension other than
            ``expected_dim``, NaN or infinite values, or a network mismatch.
    """
    check_int("batch_size", batch_size, low=1)
    file, archive = _open_npz(path, "path")
    with archive:
        keys = set(archive.files)
        identity = _parse_json(archive, "identity", file)
        source = _parse_json(archive, "source", file)
        if ("mu" in keys) != ("sigma" in keys):
            present, absent = ("mu", "sigma") if "mu" in keys else ("sigma", "mu")
            raise ValueError(f"reference file {str(file)!r} is not accepted; it has {present!r} but not {absent!r}")
        features = _read(archive, "features", file) if "features" in keys else None
        if "mu" in keys:
            try:
                reference = ReferenceStatistics(_read(archive, "mu", file), _read(archive, "sigma", file), features,
                                                identity, source)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"reference file {str(file)!r} is not accepted: {exc}") from exc
        elif features is not None:
            try:
                reference = ReferenceStatistics.from_features(features, identity, source=source)
            except ValueError as exc:
                raise ValueError(f"reference file {str(file)!r} is not accepted: {exc}") from exc
        elif "arr_0" in keys:
            if network is None:
                raise ValueError(f"reference file {str(file)!r} holds images (arr_0) but no statistics; pass "
                                 "network= to compute their features, or use reference_from_npz_images")
            reference = _from_images(_images(archive, file), network, batch_size, True,
                                     {"kind": "npz", "path": str(file)})
        else:
            raise ValueError(f"reference file {str(file)!r} is not accepted; it has keys {sorted(keys)}, expected "
                             "mu and sigma (ADM / pytorch-fid / clean-fid layout), features, or arr_0 images")
    if expected_dim is None and network is not None:
        expected_dim = network.dim
    if expected_dim is not None and reference.dim != expected_dim:
        raise ValueError(f"reference file {str(file)!r} is not accepted; its features are {reference.dim}-d, expected "
                         f"{expected_dim}-d (the feature network's dim)")
    if network is not None and reference.identity is not None:
        _check_identity(reference.identity, network.identity(), file)
    return reference


def _check_identity(stored: dict[str, Any], current: dict[str, Any], file: Path) -> None:
    different = [k for k in _CHECKED_IDENTITY if k in stored and k in current and stored[k] != current[k]]
    if different:
        found = ", ".join(f"{k}: {stored[k]!r} in the file vs {current[k]!r}" for k in different)
        raise ValueError(f"reference file {str(file)!r} is not accepted; it was made with another feature network "
                         f"or preprocessing ({found})")


def save_reference(path: str | Path, reference: ReferenceStatistics) -> Path:
    """Write ``reference`` to ``path`` (exactly that name; ``.npz`` recommended) in the documented layout.

    The file is written to a temporary file in the same directory and renamed over ``path``, so readers never
    see a partial file. Returns the path.
    """
    file = Path(path).expanduser()
    file.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {"mu": reference.mu.astype(np.float64), "sigma": reference.sigma.astype(np.float64)}
    if reference.features is not None:
        arrays["features"] = reference.features.astype(np.float32)
    for key, value in (("identity", reference.identity), ("source", reference.source)):
        if value is not None:
            arrays[key] = np.array(json.dumps(value, sort_keys=True))
    partial = file.with_name(f".{file.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(partial, "xb") as handle:
            np.savez(handle, **arrays)
        os.replace(partial, file)
    finally:
        partial.unlink(missing_ok=True)
    return file


def _from_images(images: np.ndarray, network: FeatureNetwork, batch_size: int, keep_features: bool,
                 source: dict[str, Any]) -> ReferenceStatistics:
    """Statistics of a uint8 NHWC array, ``batch_size`` images at a time."""
    return _accumulate((images[i:i + batch_size] for i in range(0, len(images), batch_size)), network,
                       keep_features, source)


def _accumulate(batches: Iterator[np.ndarray], network: FeatureNetwork, keep_features: bool,
                source: dict[str, Any]) -> ReferenceStatistics:
    """Statistics of the features of ``batches``; ``source`` is recorded with the number of images added."""
    stats = RunningStatistics(network.dim)
    kept = []
    for batch in batches:
        features = network(batch).features.numpy()
        stats.update(features)
        if keep_features:
            kept.append(features)
    if stats.count < 2:
        raise ValueError(f"{stats.count} reference image(s) are not accepted; expected at least 2")
    return ReferenceStatistics(stats.mean, stats.covariance, np.concatenate(kept) if keep_features else None,
                               network.identity(), {**source, "images": stats.count})


def _check_limit(limit: int | None) -> None:
    if limit is not None:
        check_int("limit", limit, low=1)


def reference_from_npz_images(path: str | Path, network: FeatureNetwork, batch_size: int = 256, *,
                              keep_features: bool = True, limit: int | None = None) -> ReferenceStatistics:
    """Reference statistics of the ``arr_0`` images (uint8 NHWC) of an ADM sample or reference batch ``.npz``
    (the first ``limit`` of them, if given), computed with ``network``; stored ``mu``/``sigma`` in the file are
    ignored."""
    check_int("batch_size", batch_size, low=1)
    _check_limit(limit)
    file, archive = _open_npz(path, "path")
    with archive:
        if "arr_0" not in archive.files:
            raise ValueError(f"path={str(path)!r} is not accepted; it has keys {sorted(archive.files)}, expected "
                             "arr_0 (uint8 images N x H x W x 3)")
        images = _images(archive, file)[:limit]
    return _from_images(images, network, batch_size, keep_features, {"kind": "npz", "path": str(file)})


def _folder_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                  key=lambda p: p.relative_to(folder).as_posix())


def _load_rgb(file: Path) -> np.ndarray:
    try:
        with Image.open(file) as image:
            return np.array(image.convert("RGB"))
    except OSError as exc:
        raise ValueError(f"image file {str(file)!r} is not accepted; PIL cannot read it ({exc})") from exc


def _same_size_runs(files: list[Path], batch_size: int) -> Iterator[np.ndarray]:
    """Stacks of at most ``batch_size`` consecutive images of equal size, in file order."""
    run: list[np.ndarray] = []
    for file in files:
        image = _load_rgb(file)
        if run and (image.shape != run[0].shape or len(run) == batch_size):
            yield np.stack(run)
            run = []
        run.append(image)
    if run:
        yield np.stack(run)


def reference_from_folder(folder: str | Path, network: FeatureNetwork, batch_size: int = 256, *,
                          keep_features: bool = True, limit: int | None = None) -> ReferenceStatistics:
    """Reference statistics of every PNG, JPEG and WebP image under ``folder`` (recursively; the first ``limit``
    of them, if given), computed with ``network``.

    Files are read in sorted order of their path relative to ``folder`` (so ``features`` rows follow it),
    converted to RGB with PIL and passed to the network ``batch_size`` at a time; images may differ in size
    (the network's preprocessing resizes them).
    """
    check_int("batch_size", batch_size, low=1)
    _check_limit(limit)
    directory = Path(folder).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"folder={str(folder)!r} is not accepted; no such directory")
    files = _folder_images(directory)
    if len(files) < 2:
        raise ValueError(f"folder={str(folder)!r} is not accepted; it holds {len(files)} image(s) with endings "
                         f"{IMAGE_EXTENSIONS}, expected at least 2")
    return _accumulate(_same_size_runs(files[:limit], batch_size), network, keep_features,
                       {"kind": "folder", "path": str(directory)})


def reference_from_source(source: str, network: FeatureNetwork, batch_size: int = 256, *,
                          keep_features: bool = True, limit: int | None = None) -> ReferenceStatistics:
    """Reference statistics of what ``source`` names (``guidekit reference --from``), for ``network``.

    * ``"default"``: the embedded default model's held-out images (:data:`DEFAULT_HELD_OUT`), through
      :func:`reference_from_npz_images`;
    * a directory: :func:`reference_from_folder`;
    * an ``.npz`` file with ADM's ``arr_0`` images: :func:`reference_from_npz_images` (stored statistics ignored);
    * an ``.npz`` file with ``mu``/``sigma`` and/or ``features`` only (ADM, pytorch-fid, clean-fid or guidekit
      statistics): read by :func:`load_reference` with ``network``, which checks shapes, values, the dimension and,
      where the file records one, the network identity; the statistics are kept as they are (no identity is added
      to a file without one). ``limit`` is refused for such a file.

    ``limit`` keeps the first images in file order; ``keep_features=False`` keeps ``mu`` and ``sigma`` only. The
    result's ``source`` records the kind (``default``, ``folder``, ``npz`` or ``statistics``), the path and the
    number of images (``None`` for statistics without features).

    Raises:
        FileNotFoundError: ``source`` is neither ``"default"`` nor an existing file or directory, or the held-out
            images are missing.
        ValueError: an unreadable or malformed source, fewer than 2 images, or statistics that do not fit
            ``network``.
    """
    check_int("batch_size", batch_size, low=1)
    _check_limit(limit)
    if source == DEFAULT_SOURCE:
        if not DEFAULT_HELD_OUT.is_file():
            raise FileNotFoundError(f"source={source!r} is not accepted; the embedded model's held-out images are "
                                    f"missing from {DEFAULT_HELD_OUT} (python scripts/model_card.py writes them)")
        reference = reference_from_npz_images(DEFAULT_HELD_OUT, network, batch_size, keep_features=keep_features,
                                              limit=limit)
        reference.source = {**(reference.source or {}), "kind": "default", "path": DEFAULT_SOURCE}
        return reference
    path = Path(source).expanduser()
    if path.is_dir():
        return reference_from_folder(path, network, batch_size, keep_features=keep_features, limit=limit)
    if not path.is_file():
        raise FileNotFoundError(f"source={source!r} is not accepted; no such file or directory (expected "
                                f"{DEFAULT_SOURCE!r}, an image folder or an .npz file)")
    file, archive = _open_npz(path, "source")
    with archive:
        has_images = "arr_0" in archive.files
    if has_images:
        return reference_from_npz_images(file, network, batch_size, keep_features=keep_features, limit=limit)
    if limit is not None:
        raise ValueError(f"limit={limit} is not accepted with source={source!r}, which holds statistics, not "
                         "images; expected no limit")
    reference = load_reference(file, network=network)
    count = None if reference.features is None else len(reference.features)
    if not keep_features:
        reference.features = None
    reference.source = reference.source or {"kind": "statistics", "path": str(file), "images": count}
    return reference
