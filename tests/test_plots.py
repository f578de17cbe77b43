"""A run's curves and bound terms as files in its directory (ddpm.plots)."""

from __future__ import annotations

import numpy as np

from ddpm.plots import logged_curves, plot_run


def _write_csv(path, rows):
    path.parent.mkdir(parents=True)
    keys = ["epoch", "step", "lr-Adam", "train/loss", "train/loss_q0", "fd_digits_8_dpmpp2"]
    lines = [",".join(keys)]
    for row in rows:
        lines.append(",".join(str(row.get(k, "")) for k in keys))
    path.write_text("\n".join(lines) + "\n")


def test_plot_run_reads_every_csv_version_and_the_bound_terms(tmp_path):
    run = tmp_path / "run"
    _write_csv(
        run / "csv" / "version_0" / "metrics.csv",
        [{"step": 1, "lr-Adam": 0.1}, {"epoch": 0, "step": 1, "train/loss": 0.5}],
    )
    _write_csv(  # a resumed run: version 1 continues, and version 10 sorts after 2, not after 1
        run / "csv" / "version_1" / "metrics.csv",
        [{"epoch": 1, "step": 3, "train/loss": 0.25, "train/loss_q0": "nan"}],
    )
    _write_csv(run / "csv" / "version_10" / "metrics.csv", [{"step": 9, "fd_digits_8_dpmpp2": 7.5}])
    _write_csv(run / "csv" / "version_2" / "metrics.csv", [{"step": 5, "train/loss": 0.2}])
    curves = logged_curves(run)
    assert curves["train/loss"] == [(1, 0.5), (3, 0.25), (5, 0.2)]
    assert curves["lr-Adam"] == [(1, 0.1)]
    assert curves["fd_digits_8_dpmpp2"] == [(9, 7.5)]
    assert "train/loss_q0" not in curves  # non-finite values are left out
    (run / "nll").mkdir()
    np.save(run / "nll" / "terms_step0000003.npy", np.linspace(1.0, 0.001, 50))
    import matplotlib.pyplot as plt

    previous = plt.get_backend()
    plt.switch_backend("svg")  # stands in for a notebook's inline backend
    try:
        written = plot_run(run)
        # Training calls this from inside notebooks: it must not switch their backend to Agg
        # (notebooks 02 and 03 then showed no figure at all).
        assert plt.get_backend() == "svg"
    finally:
        plt.switch_backend(previous)
    assert [p.name for p in written] == ["training.png", "sample_quality.png", "bound_terms.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_on_a_run_that_logged_nothing(tmp_path):
    assert plot_run(tmp_path) == [] and not (tmp_path / "plots").exists()
