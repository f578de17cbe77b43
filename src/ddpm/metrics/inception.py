"""torch-fidelity's TF-compatible Inception-v3 (``inception-v3-compat``), loaded from a file.

Weights resolution order (first hit wins; see :func:`resolve_inception_weights`):

1. an explicit path (``metrics.inception_weights=PATH`` in the configs, ``inception_weights=`` in
   Python);
2. the environment variable ``DDPM_INCEPTION_WEIGHTS``;
3. torch hub's checkpoint cache, where torch-fidelity itself downloads the file:
   ``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``
   (``$TORCH_HOME`` defaults to ``~/.cache/torch``; ``torch.hub.get_dir()`` prints the hub dir);
4. only if ``allow_download``: a download of torch-fidelity's URL into exactly that cache file
   (``torch.hub.download_url_to_file`` writes a temporary file and renames it).

If none of these yields a file, :class:`InceptionWeightsUnavailable` is raised with a message
that says where to put the file. Nothing is downloaded anywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from ddpm.errors import UserError
from ddpm.metrics.features import exact_float32, sha256_file

__all__ = [
    "INCEPTION_FEATURE_LAYER",
    "INCEPTION_LOGITS_LAYER",
    "INCEPTION_NAME",
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_ENV",
    "InceptionFeatureExtractor",
    "InceptionWeightsUnavailable",
    "hub_cache_path",
    "make_random_inception_weights",
    "resolve_inception_weights",
]

INCEPTION_NAME = "inception-v3-compat"
INCEPTION_FEATURE_LAYER = "2048"
INCEPTION_LOGITS_LAYER = "logits_unbiased"
INCEPTION_WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"

try:  # keep the URL in sync with the installed torch-fidelity
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3 as INCEPTION_URL
except ImportError:  # pragma: no cover - torch-fidelity is a hard dependency
    INCEPTION_URL = (
        "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
        "weights-inception-2015-12-05-6726825d.pth"
    )


class InceptionWeightsUnavailable(UserError):
    """The Inception weights file was not found and could not (or may not) be downloaded."""


def hub_cache_path() -> Path:
    """The file torch-fidelity's ``load_state_dict_from_url`` would read or download to."""
    filename = os.path.basename(urlparse(INCEPTION_URL).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _where_to_put_it() -> str:
    return (
        f"Download {INCEPTION_URL} on a machine with internet access and either pass its path "
        f"(config: metrics.inception_weights=/path/to/{hub_cache_path().name}; Python: "
        f"inception_weights=...), set the environment variable {INCEPTION_WEIGHTS_ENV}=/path/to/file, "
        f"or copy it to torch hub's cache at {hub_cache_path()}."
    )


def resolve_inception_weights(
    path: str | os.PathLike[str] | None = None, *, allow_download: bool = True
) -> Path:
    """Find the ``inception-v3-compat`` weights file (resolution order in the module docstring).

    Args:
        path: explicit weights file; None or ``""`` means "not given".
        allow_download: permit step 4 (download into torch hub's cache).

    Returns:
        path of an existing file.

    Raises:
        InceptionWeightsUnavailable: a given path does not exist, or nothing was found and the
            download was not allowed or failed. The message says where to put the file.
    """
    for source, candidate in (
        ("inception_weights", path),
        (INCEPTION_WEIGHTS_ENV, os.environ.get(INCEPTION_WEIGHTS_ENV)),
    ):
        if candidate is not None and str(candidate) != "":
            resolved = Path(candidate).expanduser()
            if not resolved.is_file():
                raise InceptionWeightsUnavailable(
                    f"Inception weights file given by {source} does not exist: {resolved}. "
                    + _where_to_put_it()
                )
            return resolved
    cached = hub_cache_path()
    if cached.is_file():
        return cached
    if not allow_download:
        raise InceptionWeightsUnavailable(
            f"Inception weights not found (downloads disabled). {_where_to_put_it()}"
        )
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=False)
    except Exception as exc:  # no network, proxy, disk full, ...
        raise InceptionWeightsUnavailable(
            f"Inception weights not found and downloading {INCEPTION_URL} failed "
            f"({type(exc).__name__}: {exc}). {_where_to_put_it()}"
        ) from exc
    if not cached.is_file():  # pragma: no cover - download_url_to_file renames on success
        raise InceptionWeightsUnavailable(
            f"download did not produce {cached}. {_where_to_put_it()}"
        )
    return cached


def _build_inception(weights_path: Path) -> nn.Module:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3(
        INCEPTION_NAME,
        [INCEPTION_FEATURE_LAYER, INCEPTION_LOGITS_LAYER],
        feature_extractor_weights_path=str(weights_path),
    )
    model.requires_grad_(False)
    return model.eval()


class InceptionFeatureExtractor:
    """torch-fidelity's ``inception-v3-compat`` returning pool features and unbiased logits.

    Args:
        weights_path: weights file, or None to resolve it (see :func:`resolve_inception_weights`).
        device: where the network runs.
        allow_download: permit downloading into torch hub's cache when nothing is found.

    Call with uint8 images ``[B, C, H, W]`` (C = 1 is repeated to 3; any H, W: torch-fidelity
    resizes to 299×299 with its TF1-compatible bilinear interpolation) to get
    ``{"features": [B, 2048] float32, "logits": [B, 1008] float32}``. Runs in float32 without
    autocast or TF32.

    Raises:
        InceptionWeightsUnavailable: see :func:`resolve_inception_weights`.
    """

    name = INCEPTION_NAME
    feature_layer = INCEPTION_FEATURE_LAYER
    num_features = 2048
    has_logits = True
    num_logits = 1008

    def __init__(
        self,
        weights_path: str | os.PathLike[str] | None = None,
        device: torch.device | str = "cpu",
        allow_download: bool = True,
    ) -> None:
        self.weights_path = resolve_inception_weights(weights_path, allow_download=allow_download)
        self.weights_sha256 = sha256_file(self.weights_path)
        self.device = torch.device(device)
        self.model = _build_inception(self.weights_path).to(self.device)

    def __call__(self, images_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        if images_u8.dtype != torch.uint8 or images_u8.ndim != 4:
            raise ValueError(
                f"expected uint8 images [B, C, H, W], got {images_u8.dtype} {tuple(images_u8.shape)}"
            )
        channels = images_u8.shape[1]
        if channels == 1:
            images_u8 = images_u8.expand(-1, 3, -1, -1)
        elif channels != 3:
            raise ValueError(f"Inception needs 1 or 3 channels, got {channels}")
        with exact_float32(self.device):
            features, logits = self.model(images_u8.to(self.device).contiguous())
        return {"features": features.float(), "logits": logits.float()}

    def __repr__(self) -> str:
        return f"InceptionFeatureExtractor(weights={self.weights_path}, device={self.device})"


def make_random_inception_weights(path: str | os.PathLike[str], seed: int = 0) -> dict[str, Any]:
    """Write a randomly initialised ``inception-v3-compat`` state dict to ``path`` (tests only).

    Convolutions get Kaiming-normal weights (fan-in, ReLU gain), BatchNorm keeps PyTorch's
    defaults (identity), the 1008-way classifier gets N(0, 0.25²) weights and zero bias so that the
    logits have a spread of a few units (a non-trivial Inception Score). The result exercises the
    real graph offline but its features mean nothing.

    Returns:
        the state dict that was saved.
    """
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    def _no_download(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {}

    generator = torch.Generator().manual_seed(seed)
    with (
        mock.patch.object(fe, "load_state_dict_from_url", _no_download),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None),
    ):
        model = fe.FeatureExtractorInceptionV3(INCEPTION_NAME, [INCEPTION_FEATURE_LAYER])
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                std = (
                    2.0 / (module.in_channels // module.groups * module.weight[0, 0].numel())
                ) ** 0.5
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.25)
                module.bias.zero_()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tmp = Path(f"{path}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return state
