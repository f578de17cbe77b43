"""Sample-quality and likelihood evaluation: FID / IS (Inception), ``fd_digits``, bits/dim.

See ``docs/evaluation.md`` for the protocol. Public entry points:

- maths: :class:`FeatureStats`, :func:`frechet_distance`, :func:`inception_score`;
- feature networks: :class:`InceptionFeatureExtractor` (torch-fidelity's ``inception-v3-compat``
  loaded from a file), :class:`DigitsFeatureExtractor` (the ``fd_digits`` proxy);
- pipelines (collective under ``torch.distributed``, fine without it):
  :func:`generate_samples_sharded`, :func:`reference_statistics`,
  :func:`evaluate_sample_quality`, :func:`evaluate_nll`.
"""

from ddpm.metrics.digits_classifier import DigitsFeatureExtractor, load_or_train_digits_classifier
from ddpm.metrics.evaluate import (
    build_feature_extractor,
    compute_nll,
    compute_sample_quality,
    evaluate_nll,
    evaluate_sample_quality,
    metric_prefix,
    name_sample_quality,
    resolve_extractor_kind,
)
from ddpm.metrics.features import (
    FeatureExtractor,
    default_cache_dir,
    exact_float32,
    quantize_to_uint8,
    sha256_file,
)
from ddpm.metrics.fid import FeatureStats, frechet_distance, mean_cov
from ddpm.metrics.inception import (
    INCEPTION_URL,
    INCEPTION_WEIGHTS_ENV,
    InceptionFeatureExtractor,
    InceptionWeightsUnavailable,
    hub_cache_path,
    make_random_inception_weights,
    resolve_inception_weights,
)
from ddpm.metrics.inception_score import inception_score
from ddpm.metrics.reference import dataset_name_of, extract_dataset_stats, reference_statistics
from ddpm.metrics.sampling import batch_seed, generate_samples_sharded, iter_sample_batches

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_WEIGHTS_ENV",
    "DigitsFeatureExtractor",
    "FeatureExtractor",
    "FeatureStats",
    "InceptionFeatureExtractor",
    "InceptionWeightsUnavailable",
    "batch_seed",
    "build_feature_extractor",
    "compute_nll",
    "compute_sample_quality",
    "dataset_name_of",
    "default_cache_dir",
    "evaluate_nll",
    "evaluate_sample_quality",
    "exact_float32",
    "extract_dataset_stats",
    "frechet_distance",
    "generate_samples_sharded",
    "hub_cache_path",
    "inception_score",
    "iter_sample_batches",
    "load_or_train_digits_classifier",
    "make_random_inception_weights",
    "mean_cov",
    "metric_prefix",
    "name_sample_quality",
    "quantize_to_uint8",
    "reference_statistics",
    "resolve_extractor_kind",
    "resolve_inception_weights",
    "sha256_file",
]
