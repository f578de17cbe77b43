"""W&B without surprises: offline mode when no credentials are configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger", "wandb_has_credentials"]


def wandb_has_credentials() -> bool:
    """True when W&B can log in: ``WANDB_API_KEY`` set, or an ``api.wandb.ai`` entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc_path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(netrc_path)).hosts
    except (OSError, netrc.NetrcParseError):
        return False
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = base.split("://", 1)[-1].split("/", 1)[0]
    return host in hosts


class WandbLogger(_LightningWandbLogger):
    """Lightning's W&B logger without the ``anonymous`` argument it always passes.

    Lightning sends ``anonymous=None`` to ``wandb.init`` unless told otherwise, and W&B answers
    every run with "The anonymous setting has no effect and will be removed": a notice about
    Lightning's call, not about the user's run. Passing ``anonymous=True`` keeps it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
