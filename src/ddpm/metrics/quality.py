"""FID, ``fd_digits`` and the Inception Score as :class:`torchmetrics.Metric` subclasses.

Every state is a float64 (or int64) *sum*, so merging the ranks of a DDP run is torchmetrics'
own ``sum`` reduction and the result does not depend on how the samples were split:

- :class:`FeatureMoments`: N, Σ xₙ ``[D]`` and XᵀX = Σ xₙ xₙᵀ ``[D, D]`` of feature vectors;
- :class:`FrechetDistance` (and :class:`FrechetInceptionDistance`, :class:`DigitsFrechetDistance`):
  those moments, compared with fixed reference moments by torch-fidelity's formula
  (:func:`~ddpm.metrics.fid.frechet_distance`);
- :class:`InceptionScore`: torch-fidelity assigns sample row j of a permutation to a split, and
  that permutation (``RandomState(2020).permutation(N)``) is fixed by N, so the split of each
  sample follows from its global index. Per split the score needs only Σₓ p(y|x) ``[K]``,
  Σₓ Σ_y p log p and the count, all sums: the logits of the other ranks are reduced, never
  stored (``splits × K`` floats instead of ``N × K``).

The metrics take uint8 images (``update(images_u8, indices)``) and run their feature extractor,
or take its outputs (``update(features=…)``), so that FID and IS on the same batch share one
Inception forward pass (:class:`~ddpm.metrics.evaluate.SampleQuality` does this).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torchmetrics import Metric

from ddpm.metrics.features import FeatureExtractor
from ddpm.metrics.fid import frechet_distance

__all__ = [
    "DigitsFrechetDistance",
    "FeatureMoments",
    "FrechetDistance",
    "FrechetInceptionDistance",
    "InceptionScore",
    "extract_in_chunks",
]


def extract_in_chunks(
    extractor: FeatureExtractor, images_u8: torch.Tensor, chunk: int = 100
) -> dict[str, torch.Tensor]:
    """``extractor`` on ``images_u8 [B, C, H, W]`` in chunks of ``chunk`` images (bounds memory)."""
    if images_u8.shape[0] == 0:
        raise ValueError("no images to extract features from")
    parts = [extractor(images_u8[i : i + chunk]) for i in range(0, images_u8.shape[0], chunk)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


class _ExtractorMetric(Metric):
    """A metric of uint8 images computed from the outputs of a feature extractor."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, extractor: FeatureExtractor | None, feature_batch_size: int = 100) -> None:
        super().__init__()
        # Not a submodule: the extractor manages its own device and is shared between metrics.
        object.__setattr__(self, "extractor", extractor)
        self.feature_batch_size = int(feature_batch_size)

    def _outputs(
        self,
        images_u8: torch.Tensor | None,
        features: Mapping[str, torch.Tensor] | None,
    ) -> Mapping[str, torch.Tensor]:
        if (images_u8 is None) == (features is None):
            raise ValueError("pass exactly one of images_u8 or features")
        if features is not None:
            return features
        if self.extractor is None:
            raise ValueError(f"{type(self).__name__} has no extractor: pass features=...")
        return extract_in_chunks(self.extractor, images_u8, self.feature_batch_size)


class FeatureMoments(_ExtractorMetric):
    """Streaming float64 moments of feature vectors: the sufficient statistics of FID.

    States (sum-reduced across ranks): ``count`` (N), ``feature_sum`` Σ xₙ ``[D]`` and
    ``feature_outer`` XᵀX ``[D, D]`` (``D² · 8`` bytes: 32 MiB for Inception's 2048-d features).

    Args:
        num_features: D.
        extractor: maps uint8 images to ``{"features": [B, D]}``; None to feed features only.
        feature_batch_size: images per extractor call.
        expected_count: when given, :meth:`compute` checks that exactly this many feature
            vectors arrived over all ranks.
    """

    def __init__(
        self,
        num_features: int,
        extractor: FeatureExtractor | None = None,
        feature_batch_size: int = 100,
        expected_count: int | None = None,
    ) -> None:
        super().__init__(extractor, feature_batch_size)
        self.expected_count = None if expected_count is None else int(expected_count)
        d = int(num_features)
        if d < 1:
            raise ValueError(f"num_features must be >= 1, got {num_features}")
        self.num_features = d
        self.add_state("count", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("feature_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "feature_outer", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(
        self,
        images_u8: torch.Tensor | None = None,
        *,
        features: Mapping[str, torch.Tensor] | torch.Tensor | None = None,
    ) -> None:
        """Add uint8 images ``[B, C, H, W]`` or their features (``[B, D]`` or the extractor's dict)."""
        if isinstance(features, torch.Tensor):
            features = {"features": features}
        x = self._outputs(images_u8, features)["features"].to(self.device, torch.float64)
        if x.ndim != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"features must be [N, {self.num_features}], got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("features contain NaN or Inf")
        self.count += x.shape[0]
        self.feature_sum += x.sum(dim=0)
        self.feature_outer += x.T @ x

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean ``[D]`` and unbiased covariance ``[D, D]`` (float64), as ``numpy.cov(rowvar=False)``.

        Uses the states as they are; :meth:`compute` calls it with the ranks merged.

        Raises:
            ValueError: with fewer than 2 feature vectors.
            RuntimeError: when ``expected_count`` is set and differs from the count.
        """
        n = int(self.count)
        if self.expected_count is not None and n != self.expected_count:
            raise RuntimeError(
                f"{type(self).__name__} received {n} feature vectors, expected "
                f"{self.expected_count} (missing or duplicate samples)"
            )
        if n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
        mu = self.feature_sum.cpu().numpy() / n
        outer = self.feature_outer.cpu().numpy()
        sigma = (outer - n * np.outer(mu, mu)) / (n - 1.0)
        return mu, 0.5 * (sigma + sigma.T)  # exact symmetry despite rounding

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mu [D], sigma [D, D])`` over every rank's features."""
        return self.mean_cov()


class FrechetDistance(FeatureMoments):
    """Fréchet distance of the features of generated images to fixed reference statistics.

    ``compute()`` returns a float64 scalar tensor, in squared feature units.

    Args:
        reference: ``(mu [D], sigma [D, D])`` of the reference (training-set) features.
        extractor, feature_batch_size, expected_count: as :class:`FeatureMoments`.
    """

    #: The metric's key, before the protocol suffixes (``fid_50k``, ``fd_digits_1k_dpmpp20``).
    metric_name = "fd"

    def __init__(
        self,
        reference: tuple[np.ndarray, np.ndarray],
        extractor: FeatureExtractor | None = None,
        feature_batch_size: int = 100,
        expected_count: int | None = None,
    ) -> None:
        mu, sigma = (np.asarray(a, dtype=np.float64) for a in reference)
        super().__init__(mu.shape[0], extractor, feature_batch_size, expected_count)
        self.reference_mu, self.reference_sigma = mu, sigma

    def compute(self) -> torch.Tensor:  # type: ignore[override]
        mu, sigma = self.mean_cov()
        fd = frechet_distance(mu, sigma, self.reference_mu, self.reference_sigma)
        return torch.tensor(fd, dtype=torch.float64)


class FrechetInceptionDistance(FrechetDistance):
    """FID: :class:`FrechetDistance` on the 2048-d pool features of torch-fidelity's Inception."""

    metric_name = "fid"


class DigitsFrechetDistance(FrechetDistance):
    """``fd_digits``: :class:`FrechetDistance` on the embedded digits classifier's features."""

    metric_name = "fd_digits"


class InceptionScore(_ExtractorMetric):
    """Inception Score (mean, std over splits) with torch-fidelity 0.4.0's conventions.

    p(y|x) = softmax of the logits in float64; sample rows are permuted with
    ``RandomState(rng_seed).permutation(N)`` and split ``i`` holds permuted rows
    ``[i·N//splits, (i+1)·N//splits)``; per split KL(p(y|x) ‖ p̄(y)) is averaged and
    exponentiated; the std is the population one (ddof 0). Equal to
    :func:`~ddpm.metrics.inception_score.inception_score` on the logits in index order.

    States (sum-reduced): per split the count, Σₓ p(y|x) ``[splits, K]`` and Σₓ Σ_y p log p.

    Args:
        num_samples: N, the number of samples of the evaluation (fixes the splits).
        num_classes: K (1008 for Inception's ``logits_unbiased``).
        splits: number of splits (10 in the literature).
        extractor: returns ``"logits"``; None to feed logits only.
        rng_seed: seed of the permutation (torch-fidelity's default 2020).
    """

    higher_is_better = True
    metric_name = "is"

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        splits: int = 10,
        extractor: FeatureExtractor | None = None,
        feature_batch_size: int = 100,
        rng_seed: int = 2020,
    ) -> None:
        super().__init__(extractor, feature_batch_size)
        n, s = int(num_samples), int(splits)
        if not 1 <= s <= n:
            raise ValueError(f"splits={splits} must be between 1 and num_samples={num_samples}")
        self.num_samples, self.splits, self.num_classes = n, s, int(num_classes)
        position = np.empty(n, dtype=np.int64)
        position[np.random.RandomState(rng_seed).permutation(n)] = np.arange(n)
        bounds = np.array([(i + 1) * n // s for i in range(s)])
        split_of = np.searchsorted(bounds, position, side="right")
        self.register_buffer("split_of", torch.from_numpy(split_of), persistent=False)
        self.split_sizes = np.diff(np.concatenate([[0], bounds]))
        self.add_state("split_count", torch.zeros(s, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state(
            "prob_sum", torch.zeros(s, self.num_classes, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("plogp_sum", torch.zeros(s, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self,
        images_u8: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
        *,
        features: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Add a batch: uint8 images or the extractor's outputs, with their global sample indices.

        Args:
            images_u8: ``[B, C, H, W]`` uint8.
            indices: int ``[B]``, global sample indices in ``[0, num_samples)``.
            features: the extractor's dict (needs ``"logits"`` ``[B, K]``), instead of images.
        """
        if indices is None:
            raise ValueError("InceptionScore.update needs the global sample indices")
        logits = self._outputs(images_u8, features)["logits"].to(self.device, torch.float64)
        indices = indices.to(self.device, torch.int64)
        if logits.ndim != 2 or logits.shape != (indices.shape[0], self.num_classes):
            raise ValueError(
                f"logits must be [{indices.shape[0]}, {self.num_classes}], got {tuple(logits.shape)}"
            )
        if bool(((indices < 0) | (indices >= self.num_samples)).any()):
            raise ValueError(f"sample indices must lie in [0, {self.num_samples})")
        log_p = torch.log_softmax(logits, dim=1)
        p = log_p.exp()
        split = self.split_of[indices]
        self.split_count += torch.bincount(split, minlength=self.splits)
        self.prob_sum.index_add_(0, split, p)
        plogp = torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(dim=1)
        self.plogp_sum.index_add_(0, split, plogp)

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` over splits, float64 scalars; dimensionless, between 1 and K.

        Raises:
            RuntimeError: when a split did not receive exactly its share of the N samples.
        """
        counts = self.split_count.cpu().numpy()
        if not np.array_equal(counts, self.split_sizes):
            raise RuntimeError(
                f"Inception Score splits hold {counts.tolist()} samples, expected "
                f"{self.split_sizes.tolist()} (missing or duplicate samples)"
            )
        n = self.split_count.to(torch.float64)
        marginal = self.prob_sum / n[:, None]
        marginal_entropy_term = torch.special.xlogy(marginal, marginal).sum(dim=1)
        scores = torch.exp(self.plogp_sum / n - marginal_entropy_term)
        return scores.mean(), scores.std(unbiased=False)
