"""W&B without surprises: offline mode when no credentials are configured."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

__all__ = ["wandb_has_credentials"]


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
