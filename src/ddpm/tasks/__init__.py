"""The three tasks behind ``src/train.py``, ``src/sample.py`` and ``src/eval.py``.

Each module exposes ``run(cfg)`` on its composed Hydra config: :mod:`ddpm.tasks.train`,
:mod:`ddpm.tasks.sample`, :mod:`ddpm.tasks.evaluate`; :mod:`ddpm.tasks.common` holds what they
share. No task imports another.
"""
