"""The W&B dashboard (ddpm.dashboard): every key a panel plots is one a real training run logs.

The keys are recorded from a tiny training run whose W&B logger is the project's own logger
config with a recording stand-in for the W&B run: the loggers, callbacks and module log exactly
what they would log to W&B, and nothing leaves the machine. A metric renamed in the code then
fails here instead of leaving an empty panel on the dashboard.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import wandb
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from conftest import CONF_DIR, TINY  # tests/ is on sys.path under pytest
from ddpm import dashboard
from ddpm.dashboard import (
    FD_REGEX,
    IS_REGEX,
    STEP_KEY,
    group_keys,
    panel_keys,
    panel_patterns,
    resolve_sections,
    sample_quality_keys,
)
from ddpm.dashboard import cli as dashboard_cli
from ddpm.diffusion.sampling import SamplerSpec
from ddpm.metrics.evaluate import sample_quality_names
from ddpm.tasks.train import run as train


class RecordingRun:
    """Stands in for a ``wandb`` run: keeps what the project logs to W&B, sends nothing.

    ``history`` maps each key to the values logged under it, as W&B would store them: a chart
    from ``wandb.plot`` is stored as its table under the chart's table key (what
    ``wandb.Run.log`` does), so the keys are the ones the W&B panels read.
    """

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.id = self.name = "recorded"
        self.history: dict[str, list[Any]] = {}
        self.config_updates: list[dict[str, Any]] = []
        self.config = SimpleNamespace(update=self._update_config)

    def _update_config(self, params: dict[str, Any], allow_val_change: bool = False) -> None:
        self.config_updates.append(params)

    def log(self, data: dict[str, Any], step: int | None = None, commit: bool | None = None):
        for key, value in data.items():
            if isinstance(value, wandb.plot.CustomChart):
                value.set_key(key)
                key, value = value.spec.table_key, value.table
            self.history.setdefault(key, []).append(value)

    def finish(self) -> None:
        """``train()`` ends every job's run (see ``ddpm.tasks.train._finish_wandb``)."""
        self.finished = True


class RecordingWandbLogger(WandbLogger):
    """The project's ``WandbLogger`` config, logging into a :class:`RecordingRun`."""

    runs: ClassVar[list[RecordingRun]] = []

    def __init__(self, **kwargs: Any) -> None:
        run = RecordingRun(str(kwargs.get("save_dir", ".")))
        RecordingWandbLogger.runs.append(run)
        super().__init__(experiment=run, **kwargs)


# The tiny scale with its end-of-training sample-quality evaluation on: its metric,
# fd_digits_8_dpmpp2, is the protocol-bearing name the Table 2 and curve panels plot.
WITH_QUALITY = [*TINY, "callbacks.sample_quality.on_train_end=true"]


def _compose(overrides: list[str], tmp: Path) -> DictConfig:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp / "run")
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.cache_dir = str(tmp / "cache")
    return cfg


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> tuple[DictConfig, RecordingRun]:
    """One tiny training run with the project's W&B logger config, recorded."""
    tmp = tmp_path_factory.mktemp("dashboard")
    cfg = _compose([*WITH_QUALITY, "logger=wandb"], tmp)
    with open_dict(cfg):
        cfg.logger.wandb._target_ = f"{__name__}.RecordingWandbLogger"
    RecordingWandbLogger.runs.clear()
    metrics = train(cfg)
    assert not metrics["diverged"]
    (run,) = RecordingWandbLogger.runs
    return cfg, run


def test_every_key_a_panel_plots_is_logged_by_a_training_run(recorded):
    cfg, run = recorded
    keys = panel_keys(cfg)
    # The protocol-bearing names come from the config, as the callbacks name them.
    assert {"fd_digits_8_dpmpp2", "nll_bpd", "train/loss_q3", "lr-Adam", "samples"} <= keys
    missing = keys - run.history.keys()
    assert not missing, f"panels plot keys no run logs: {missing}; logged: {sorted(run.history)}"

    for section in resolve_sections(cfg):
        for panel in section.panels:
            values = {key: run.history.get(key) for key in panel.keys}
            if panel.kind in ("bar", "line"):
                for key, logged in values.items():
                    assert all(math.isfinite(float(v)) for v in logged), key
            elif panel.kind == "media":
                for key, logged in values.items():
                    assert all(isinstance(img, wandb.Image) for v in logged for img in v), key
            elif panel.kind == "table_line":
                (table,) = run.history[dashboard.chart_table_key(panel.keys[0])]
                assert isinstance(table, wandb.Table)
                assert set(panel.fields) <= set(table.columns)
                assert len(table.data) == int(cfg.schedule.num_timesteps)  # one L_t per t
            if panel.regex is not None:
                # The regex selects exactly the run's sample-quality keys of that panel.
                matched = {k for k in run.history if re.search(panel.regex, k)}
                assert matched == set(panel.keys), (panel.title, sorted(run.history))
    assert panel_patterns(cfg) == {FD_REGEX}  # digits: no Inception score panel


def test_sample_quality_regexes_match_every_protocol_name_and_nothing_else():
    names = {}
    for kind, n, spec in [
        ("inception", 50_000, SamplerSpec()),  # the paper's protocol: fid_50k
        ("inception", 10_000, SamplerSpec("ddim", 100)),  # fid_10k_ddim100
        ("inception", 1000, SamplerSpec("ancestral", 250)),  # respaced ancestral: fid_1k_ddpm250
        ("inception", 2000, SamplerSpec("ddim", 50, 0.5)),  # fid_2k_ddim50_eta0p5
        ("inception", 2000, SamplerSpec("ddim", 50, spacing="uniform")),  # fid_2k_ddim50_uniform
        ("digits", 1000, SamplerSpec("ddim", 50)),  # fd_digits_1k_ddim50
        ("digits", 1000, SamplerSpec("dpmpp_2m", 20)),  # fd_digits_1k_dpmpp20
        ("digits", 1000, SamplerSpec("heun", 9, spacing="logsnr")),  # fd_digits_1k_heun9_logsnr
        ("digits", 400, SamplerSpec()),  # fd_digits_400
    ]:
        roles = ("fd", "is", "is_std") if kind == "inception" else ("fd",)
        named = sample_quality_names(kind, n, spec, 1000)
        names.update({named[role]: role for role in roles})
    assert {"fd_digits_1k_dpmpp20", "fd_digits_1k_heun9_logsnr", "fid_2k_ddim50_uniform"} <= set(
        names
    )
    fd = {k for k in names if re.search(FD_REGEX, k)}
    is_ = {k for k in names if re.search(IS_REGEX, k)}
    assert fd == {k for k in names if k.startswith(("fid_", "fd_digits_"))} and len(fd) == 9
    assert is_ == {k for k in names if k.startswith("is_") and not k.endswith("_std")}
    assert len(is_) == 5
    for other in ("nll_bpd", "train/loss", "is_50k_std", "final_train_loss", "fid"):
        assert not re.search(FD_REGEX, other) and not re.search(IS_REGEX, other)


def test_cifar10_dashboard_plots_the_configured_protocol(tmp_path):
    cfg = _compose(["data=cifar10"], tmp_path)
    assert sample_quality_keys(cfg) == {  # periodic and final evaluations share one protocol
        "fd": ["fid_10k_ddim100"],
        "is": ["is_10k_ddim100"],
        "fd_curve": ["fid_10k_ddim100"],
        "is_curve": ["is_10k_ddim100"],
    }
    assert panel_patterns(cfg) == {FD_REGEX, IS_REGEX}
    # At paper scale Table 2 shows the 50k protocol; the curves also show the periodic 10k one.
    paper = resolve_sections(_compose(["data=cifar10", "+scale=paper"], tmp_path))
    bars = {p.title: p.keys for p in paper[0].panels}
    assert bars["FID / fd (end of training)"] == ("fid_50k",)
    assert bars["Inception score (end of training)"] == ("is_50k",)
    curves = {p.title: p.keys for p in paper[-1].panels}
    assert curves["FID / fd during training"] == ("fid_50k", "fid_10k_ddim100")


def test_runs_are_grouped_by_config_groups_that_training_logs(recorded):
    cfg, run = recorded
    keys = group_keys(cfg)
    assert keys == [
        "config.parameterization.name",
        "config.variance.name",
        "config.loss.name",
        "config.weighting.name",
        "config.schedule.name",
    ]
    logged = OmegaConf.create({k: v for update in run.config_updates for k, v in update.items()})
    groups = ("parameterization", "variance", "loss", "weighting", "schedule")
    for key, group in zip(keys, groups, strict=True):
        assert OmegaConf.select(logged, key) == cfg[group].name
    assert OmegaConf.select(logged, "config.seed") == cfg.seed  # the runs table's seed column


def test_group_keys_include_weighting_when_the_config_has_it():
    base = {g: {"name": g[:3]} for g in ("parameterization", "variance", "loss", "schedule")}
    assert "config.weighting.name" not in group_keys(base)
    with_weighting = group_keys({**base, "weighting": {"name": "snr"}})
    assert with_weighting == [
        "config.parameterization.name",
        "config.variance.name",
        "config.loss.name",
        "config.weighting.name",
        "config.schedule.name",
    ]


def test_workspace_object_plots_exactly_the_spec_keys(recorded, monkeypatch):
    ws = pytest.importorskip(
        "wandb_workspaces.workspaces", reason="the dashboard extra: pip install -e '.[dashboard]'"
    )
    from wandb_workspaces.workspaces import internal

    def no_network(*args, **kwargs):
        raise AssertionError("building the workspace must not reach W&B")

    monkeypatch.setattr(internal, "upsert_view2", no_network)
    monkeypatch.setattr(wandb, "Api", no_network)
    cfg, _ = recorded
    workspace = dashboard.build_workspace(
        cfg, entity="someone", project="ddpm-lab", sweep_group="ablation_cpu"
    )
    assert isinstance(workspace, ws.Workspace)
    assert dashboard.workspace_keys(workspace) == (panel_keys(cfg), panel_patterns(cfg))
    assert [s.name for s in workspace.sections] == [s.name for s in resolve_sections(cfg)]
    assert len(workspace.sections) == 5

    view = workspace._to_model().model_dump(by_alias=True, exclude_none=True)  # as saved
    runset = view["spec"]["section"]["runSets"][0]
    assert [g["name"] for g in runset["grouping"]] == [
        f"config.value.{g}.name"
        for g in ("parameterization", "variance", "loss", "weighting", "schedule")
    ]
    (condition,) = runset["filters"]["filters"]
    assert (condition["key"]["name"], condition["value"]) == ("group", "ablation_cpu")
    assert view["spec"]["section"]["settings"]["xAxis"] == STEP_KEY
    assert "summary:fd_digits_8_dpmpp2" in runset["runFeed"]["columnPinned"]


def _no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))


def test_cli_refuses_without_credentials_before_any_work(monkeypatch, tmp_path, capsys):
    _no_credentials(monkeypatch, tmp_path)

    def forbidden(*args, **kwargs):
        raise AssertionError("nothing may run without credentials")

    monkeypatch.setattr(dashboard_cli, "compose_run_config", forbidden)
    monkeypatch.setattr(dashboard_cli, "build_workspace", forbidden)
    monkeypatch.setattr(wandb, "Api", forbidden)
    assert dashboard.main(["--entity", "someone", "--project", "p"]) == 1
    err = capsys.readouterr().err
    assert "no W&B credentials" in err and "WANDB_API_KEY" in err and "--dry-run" in err


def test_cli_dry_run_lists_the_panels_without_credentials(monkeypatch, tmp_path, capsys):
    _no_credentials(monkeypatch, tmp_path)
    assert dashboard.main(["--dry-run", "data=digits", "+scale=cpu"]) == 0  # no --entity needed
    out = capsys.readouterr().out
    assert "fd_digits_5k_dpmpp15" in out and "train/loss_q0" in out and "nll_terms" in out
    assert "config.schedule.name" in out


def test_cli_needs_an_entity_only_to_save(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dashboard_cli, "wandb_has_credentials", lambda: True)
    with pytest.raises(SystemExit) as exit_info:
        dashboard.main(["--project", "p", "data=digits"])
    assert exit_info.value.code == 2
    assert "--entity is required to save a workspace (--dry-run needs none)" in (
        capsys.readouterr().err
    )


def test_cli_saves_the_workspace_for_a_sweep_group(monkeypatch, tmp_path, capsys):
    ws = pytest.importorskip(
        "wandb_workspaces.workspaces", reason="the dashboard extra: pip install -e '.[dashboard]'"
    )
    saved = []
    monkeypatch.setattr(dashboard_cli, "wandb_has_credentials", lambda: True)
    monkeypatch.setattr(ws.Workspace, "save", lambda self: saved.append(self) or self)
    monkeypatch.setattr(ws.Workspace, "url", property(lambda self: "https://wandb.example/view"))
    argv = ["--entity", "me", "--project", "p", "--sweep-group", "quickstart_optuna"]
    assert dashboard.main([*argv, "data=digits"]) == 0
    (workspace,) = saved
    assert (workspace.entity, workspace.project) == ("me", "p")
    assert workspace.name == "ddpm-lab: quickstart_optuna"
    assert "fd_digits_1k_dpmpp15" in dashboard.workspace_keys(workspace)[0]
    assert "workspace: https://wandb.example/view" in capsys.readouterr().out


def test_cli_reports_a_bad_override(monkeypatch, tmp_path, capsys):
    _no_credentials(monkeypatch, tmp_path)
    assert dashboard.main(["--entity", "e", "--dry-run", "data=no_such_data"]) == 1
    assert "no_such_data" in capsys.readouterr().err
