"""Speed benchmark: training (Lightning and a bare PyTorch loop), sampling, bits/dim, memory.

Run ``make bench DEVICE=cpu|cuda MODELS="ddpm_cifar10 small"`` or::

    python bench/bench.py --device cpu --models ddpm_cifar10 small [--quick]

For every model (``conf/model/<name>.yaml``) and every option (``default``, ``channels_last``,
``bf16_autocast``, ``compile``, ``fused_adam``) it measures on one device:

* training throughput (images/s; the median of several timed windows after warm-up) through
  :class:`ddpm.lit_module.DiffusionLitModule` in a real ``lightning.Trainer`` fit (synthetic
  in-memory data, no logger, no checkpoints, no progress bar), and through a bare PyTorch loop with
  the same network, optimiser, warm-up schedule, gradient clipping, EMA and loss. Their ratio
  (time per step, Lightning ÷ bare) is the Lightning overhead. Lightning and bare runs alternate
  (``--rounds``) so that a change of machine load affects both alike;
* the EMA update's cost as a percentage of a training step;
* sampling throughput per network evaluation (image·NFE/s), ancestral and DDIM, with
  ``pl_module.ema_net`` as every callback samples;
* bits/dim evaluation throughput (image·term/s of the variational bound);
* peak memory of each phase (CUDA ``max_memory_allocated``; on the CPU the process's maximum RSS);
* host↔device synchronisations per training step and per sampling step, counted with a
  ``TorchDispatchMode`` that sees every ``.item()``/``bool()``/``nonzero`` and every host→device
  copy, each attributed to the source line that caused it.

Each phase runs in a fresh Python process (so maximum RSS and compile caches are per phase)
unless ``--in-process`` is given. Results go to ``<out>/<device>.json`` and ``<out>/<device>.md``.
Timings use ``time.perf_counter`` with a device synchronisation at window boundaries only.

Modules: :mod:`bench.settings` (models, options, step counts), :mod:`bench.phases` (one
measurement each, on :mod:`bench.workload`), :mod:`bench.rounds` (the plan of runs),
:mod:`bench.runner` (processes, journal, command line), :mod:`bench.report` (summaries and
markdown), :mod:`bench.machine` (load, CPU, git). The synchronisation counter is
:mod:`ddpm.sync_counter`. ``bench/samplers.py`` is a separate script.
"""
