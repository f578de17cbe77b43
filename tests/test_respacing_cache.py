"""The cache of respaced diffusions is bounded and follows ``.to()`` (issue #13 D)."""

from __future__ import annotations

import gc
import weakref

import torch

from ddpm.diffusion import GaussianDiffusion, make_betas
from ddpm.diffusion.gaussian_diffusion import RESPACED_CACHE_SIZE

T = 100


def _diffusion(**kwargs: object) -> GaussianDiffusion:
    return GaussianDiffusion(make_betas("linear", T), **kwargs)


def test_cast_rebuilds_the_respaced_child_and_releases_the_old_one() -> None:
    d = _diffusion(
        variance="learned", loss="hybrid"
    )  # the learned variance holds the parent as well
    old_child, _ = d.respaced(10)
    assert old_child.betas.dtype == torch.float32
    old = weakref.ref(old_child)
    del old_child

    d.to(torch.float64)
    gc.collect()
    assert old() is None, "the float32 child outlived the cast"
    child, kept = d.respaced(10)
    # Rebuilt from the float64 βs: the same tables as a diffusion made in float64.
    fresh, fresh_kept = _diffusion(variance="learned", loss="hybrid", dtype=torch.float64).respaced(
        10
    )
    for name in ("betas", "alphas_cumprod", "posterior_log_variance_clipped", "log_betas"):
        table = getattr(child, name)
        assert table.dtype == torch.float64, name
        assert torch.equal(table, getattr(fresh, name)), name
    assert torch.equal(kept, fresh_kept) and child.variance.parent is d

    d.float()  # every ``_apply`` (``.float``, ``.double``, ``.cuda``, ``.to``) does the same
    assert d.respaced(10)[0].betas.dtype == torch.float32


def test_child_follows_a_device_move() -> None:
    d = _diffusion()
    d.respaced(10)
    d.to("meta")  # a device change available on any machine
    child, kept = d.respaced(10)
    assert child.betas.device.type == "meta" and kept.device.type == "meta"
    assert len(d._respaced) == 1


def test_cache_is_bounded_and_keeps_the_most_recently_used() -> None:
    d = _diffusion()
    first, _ = d.respaced(2)
    for steps in range(3, 60):
        d.respaced(steps)
        d.respaced(2)  # in constant use: never evicted
        assert len(d._respaced) <= RESPACED_CACHE_SIZE
    assert len(d._respaced) == RESPACED_CACHE_SIZE
    assert d.respaced(2)[0] is first
    kept_steps = sorted(key[0] for key in d._respaced)
    assert kept_steps == [2, *range(60 - RESPACED_CACHE_SIZE + 1, 60)]
