"""``python -m ddpm.dashboard``: see :mod:`ddpm.dashboard.cli`."""

from ddpm.dashboard.cli import main

raise SystemExit(main())
