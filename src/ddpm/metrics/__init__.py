"""Sample-quality and likelihood evaluation: FID / IS (Inception), ``fd_digits``, bits/dim.

See ``docs/evaluation.md`` for the protocol. Public entry points:

- torchmetrics metrics (float64 sum states, merged across DDP ranks by torchmetrics):
  :class:`FrechetInceptionDistance`, :class:`DigitsFrechetDistance`, :class:`InceptionScore`,
  :class:`FeatureMoments`, :class:`BitsPerDim`; the formula :func:`frechet_distance`;
- feature networks: :class:`InceptionFeatureExtractor` (torch-fidelity's ``inception-v3-compat``
  loaded from a file), :class:`DigitsFeatureExtractor` (the ``fd_digits`` proxy);
- the evaluation path (collective under a Lightning strategy, fine without one):
  :class:`SampleQuality`, :func:`run_sample_quality`, :func:`evaluate_sample_quality`,
  :func:`reference_statistics`, :func:`run_nll`, :func:`evaluate_nll`.
"""

from ddpm.metrics.bound import NLL_ESTIMATORS, BitsPerDim, evaluate_nll, nll_metric_name, run_nll
from ddpm.metrics.collective import Collective, single_process
from ddpm.metrics.digits_classifier import DigitsFeatureExtractor, load_or_train_digits_classifier
from ddpm.metrics.evaluate import (
    SampleQuality,
    build_feature_extractor,
    evaluate_sample_quality,
    metric_prefix,
    resolve_extractor_kind,
    run_sample_quality,
    sample_quality_names,
)
from ddpm.metrics.features import (
    FeatureExtractor,
    default_cache_dir,
    exact_float32,
    quantize_to_uint8,
    sha256_file,
)
from ddpm.metrics.fid import frechet_distance, mean_cov
from ddpm.metrics.inception import (
    INCEPTION_URL,
    INCEPTION_WEIGHTS_ENV,
    InceptionFeatureExtractor,
    InceptionWeightsUnavailable,
    hub_cache_path,
    make_random_inception_weights,
    resolve_inception_weights,
)
from ddpm.metrics.quality import (
    DigitsFrechetDistance,
    FeatureMoments,
    FrechetDistance,
    FrechetInceptionDistance,
    InceptionScore,
)
from ddpm.metrics.reference import dataset_name_of, extract_dataset_stats, reference_statistics
from ddpm.metrics.sampling import (
    batch_seed,
    generate_samples_sharded,
    iter_sample_batches,
    shard_batches,
)

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_ENV",
    "NLL_ESTIMATORS",
    "BitsPerDim",
    "Collective",
    "DigitsFeatureExtractor",
    "DigitsFrechetDistance",
    "FeatureExtractor",
    "FeatureMoments",
    "FrechetDistance",
    "FrechetInceptionDistance",
    "InceptionFeatureExtractor",
    "InceptionScore",
    "InceptionWeightsUnavailable",
    "SampleQuality",
    "batch_seed",
    "build_feature_extractor",
    "dataset_name_of",
    "default_cache_dir",
    "evaluate_nll",
    "evaluate_sample_quality",
    "exact_float32",
    "extract_dataset_stats",
    "frechet_distance",
    "generate_samples_sharded",
    "hub_cache_path",
    "iter_sample_batches",
    "load_or_train_digits_classifier",
    "make_random_inception_weights",
    "mean_cov",
    "metric_prefix",
    "nll_metric_name",
    "quantize_to_uint8",
    "reference_statistics",
    "resolve_extractor_kind",
    "resolve_inception_weights",
    "run_nll",
    "run_sample_quality",
    "sample_quality_names",
    "sha256_file",
    "shard_batches",
    "single_process",
]
