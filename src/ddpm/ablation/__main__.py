"""``python -m ddpm.ablation``."""

from ddpm.ablation.cli import main

raise SystemExit(main())
