"""The two experiment drivers behind ``jobs/tune.py`` and ``jobs/ablate.py``.

Both resolve the base config as ``jobs/train.py`` does, check every trial's config before Ray
starts, run their trials through :mod:`raypipe.tune.driver`, and write their tables into
``<storage>/<search name>/``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from raypipe.config import Config, ConfigError, load_config, with_overrides
from raypipe.tune import ablation as abl
from raypipe.tune import driver as drv
from raypipe.tune.space import TuneSpec, example_points, param_space, yaml_scalar

log = logging.getLogger(__name__)


def search_name(storage: str, given: str | None, prefix: str, resume: bool) -> str:
    """``given``, or ``<prefix>-<date>-<time>``; ``resume`` picks the latest ``<prefix>-*``."""
    from raypipe.api import latest_run

    if given:
        return given
    if resume:
        latest = latest_run(storage, prefix)
        if latest is None:
            raise ConfigError(
                f"--resume: no earlier search named {prefix}-* in {storage}. Run without "
                "--resume, or give the search's name."
            )
        return latest
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def _storage(spec_storage: str | None, base: Config) -> str:
    from raypipe.api import expand_storage

    return expand_storage(spec_storage) if spec_storage else base.run.storage_path


def _stem(config: str | None) -> str:
    return Path(config).stem if config else "default"


def _base_job(config: str | None, overrides: list[str], base: Config, name: str, storage: str,
              **kwargs: Any) -> drv.SearchJob:
    return drv.SearchJob(
        name=name, storage_path=storage, base_config=drv.absolute_config_path(config),
        base_overrides=list(overrides) + drv.absolute_data_overrides(base)
        + [f"run.storage_path={yaml_scalar(base.run.storage_path)}"],
        track_overrides=_track_overrides(base, name, storage),
        **kwargs,
    )


def _track_overrides(base: Config, name: str, storage: str) -> list[str]:
    """With ``track.mlflow`` on: every trial logs to ``track.uri`` (default: the local store
    under the search's storage) in ``track.experiment`` (default: the search's name), which is
    set up now, before the trials race to."""
    from raypipe.report.tracking import check_tracking, prepare_experiment, tracking_uri

    if not base.track.mlflow:
        return []
    check_tracking(base, storage)
    uri, experiment = tracking_uri(base, storage), base.track.experiment or name
    prepare_experiment(uri, experiment)
    return [f"track.uri={yaml_scalar(uri)}", f"track.experiment={yaml_scalar(experiment)}"]


def _concurrency(cfgs: list[Config], requested: int | None) -> int:
    from raypipe.training.trainer import cluster_capacity

    resources, known_max = cluster_capacity()
    n = drv.max_concurrent_trials(cfgs, resources, requested=requested, known_max=known_max)
    log.info("running up to %d trial(s) at a time", n)
    return n


# ---------------------------------------------------------------- hyperparameter search


def _search_alg(spec: TuneSpec):
    if spec.search != "optuna":
        return None
    try:
        import optuna  # noqa: F401
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError(
            "search: optuna needs the optuna package (pip install optuna); or use search: random "
            "or search: grid, which need nothing extra."
        ) from None
    return OptunaSearch(seed=spec.seed)


def run_tune(config: str | None, overrides: list[str], spec: TuneSpec, *, full: bool = False,
             resume: bool = False, retrain_best: bool = False) -> dict[str, Any]:
    """Run (or resume) a search; returns ``best.json``'s content (plus the retrain summary)."""
    from raypipe.cli import init_ray, load

    base = load(config, overrides, search=True)
    storage = _storage(spec.storage_path, base)
    name = search_name(storage, spec.name, f"tune-{_stem(config)}", resume)
    job = _base_job(config, overrides, base, name, storage,
                    trial_overrides=spec.trial_overrides, presets=spec.presets,
                    subset=None if full else spec.subset, metric=spec.metric, mode=spec.mode,
                    early_stopping=spec.scheduler.type == "asha")
    cfgs = drv.check_trial_configs(job, example_points(spec))
    epochs = cfgs[0].train.epochs
    if warning := drv.grace_warning(spec.scheduler, max(c.train.warmup_epochs for c in cfgs),
                                     epochs):
        log.warning(warning)
    search_alg = _search_alg(spec)
    init_ray()
    scheduler = drv.asha(job, spec.scheduler, epochs) if job.early_stopping else None
    tuner = drv.build_tuner(job, param_space(spec), num_samples=spec.num_samples,
                            concurrency=_concurrency(cfgs, spec.max_concurrent_trials),
                            scheduler=scheduler, search_alg=search_alg, seed=spec.seed,
                            resume=resume or bool(spec.name))
    grid = tuner.fit()
    rows = drv.trial_rows(grid, spec.metric, spec.mode, max_epochs=epochs, runs_dir=job.runs_dir)
    best = drv.write_search_outputs(job, rows, spec.metric)
    if retrain_best and best.get("interrupted"):
        log.warning("the search was interrupted: not retraining the best trial until it has finished")
    elif retrain_best:
        best["retrain"] = retrain(job, best)
    return best


def retrain(job: drv.SearchJob, best: dict[str, Any]) -> dict[str, Any]:
    """Train the best trial's configuration on the full data as an ordinary run."""
    from raypipe.training.trainer import run_training

    if "best_params" not in best:
        raise ConfigError(f"--retrain-best: no trial of {job.search_dir} finished with a "
                          f"{job.metric}, so there is no best configuration to train.")
    # beside its trials in MLflow
    cfg = with_overrides(job.final_config(best["best_params"]), job.track_overrides)
    cfg.run = cfg.run.model_copy(update={"name": f"{job.name}-best"})
    log.info("retraining the best configuration on the full data as run %s", cfg.run.name)
    return run_training(cfg)


# ---------------------------------------------------------------- ablation


def overfit_config(config: str | None, overrides: list[str], spec: abl.OverfitSpec, base: Config,
                   out_dir: str) -> Config:
    """The base config on ``spec.images`` training images, no augmentation, no weight decay."""
    threshold = spec.threshold or base.train.overfit_loss
    extra = [f"train.overfit_subset={spec.images}", "augment.enabled=false",
             f"train.epochs={spec.epochs}", f"train.batch_size={spec.batch_size}",
             f"train.overfit_loss={threshold}", "run.name=overfit",
             f"run.storage_path={yaml_scalar(out_dir)}"]
    if spec.lr is not None:
        extra.append(f"train.lr={spec.lr}")
    return load_config(config, list(overrides) + extra + spec.overrides)


def overfit_check(cfg: Config) -> tuple[abl.OverfitVerdict, dict[str, Any] | None]:
    """Train ``cfg`` (an :func:`overfit_config`) and judge it."""
    from raypipe.data.sources import join_uri
    from raypipe.training.trainer import RunError, _read_json, run_dir_of, run_training

    summary, error = None, None
    try:
        summary = run_training(cfg)
        history = summary.get("history") or []
    except RunError as exc:
        error = str(exc)
        history = _read_json(join_uri(run_dir_of(cfg), "history.json")) or []
    verdict = abl.overfit_verdict(history, cfg.train.overfit_loss, cfg.train.lr, error)
    if summary is not None and summary.get("overfit_passed") is False and verdict.passed:
        verdict.passed = False  # the trainer's own check disagrees: trust the stricter one
        verdict.diagnosis = abl.diagnose(history, cfg.train.overfit_loss, cfg.train.lr)
    return verdict, summary


def run_ablation(config: str | None, overrides: list[str], spec: abl.AblationSpec, *,
                 overfit: bool = True, grid: bool = True, resume: bool = False) -> dict[str, Any]:
    """The overfit check, then (if it passed) the component grid; returns ``ablation.json``."""
    from raypipe.cli import init_ray, load
    from raypipe.data.sources import join_uri

    base = load(config, overrides, search=True)
    storage = _storage(spec.storage_path, base)
    name = search_name(storage, spec.name, f"ablate-{_stem(config)}", resume)
    out_dir = join_uri(storage, name)
    out: dict[str, Any] = {"dir": out_dir}
    variants = abl.ablation_variants(base, spec)
    job = _base_job(config, overrides, base, name, storage, trial_overrides=spec.trial_overrides,
                    presets={"variant": variants}, subset=spec.subset, metric=spec.metric, mode="max")
    cfgs = drv.check_trial_configs(job, [{"variant": v} for v in variants])
    init_ray()
    if overfit:
        cfg = with_overrides(overfit_config(config, overrides, spec.overfit, base, out_dir),
                             job.track_overrides)
        verdict, _ = overfit_check(cfg)
        out["overfit"] = {"passed": verdict.passed, "falling": verdict.falling,
                          "final_loss": verdict.final_loss, "threshold": verdict.threshold,
                          "losses": verdict.losses, "diagnosis": verdict.diagnosis}
        if not verdict.passed:
            drv.write_text(join_uri(out_dir, "ablation.json"), json.dumps(out, indent=1))
            return out
    if grid:
        out.update(_run_grid(job, spec, variants, cfgs, resume or bool(spec.name)))
    drv.write_text(join_uri(out_dir, "ablation.json"), json.dumps(out, indent=1, default=str))
    return out


def _run_grid(job: drv.SearchJob, spec: abl.AblationSpec, variants: dict, cfgs: list[Config],
              resume: bool) -> dict[str, Any]:
    from ray import tune

    from raypipe.data.sources import join_uri

    space = {"variant": tune.grid_search(list(variants)), "train.seed": tune.grid_search(spec.seeds)}
    tuner = drv.build_tuner(job, space, num_samples=1,
                            concurrency=_concurrency(cfgs, spec.max_concurrent_trials), resume=resume)
    rows = drv.trial_rows(tuner.fit(), job.metric, job.mode, max_epochs=cfgs[0].train.epochs,
                          runs_dir=job.runs_dir)
    header, records = drv.table_records(rows, job.metric)
    drv.write_text(join_uri(job.search_dir, "trials.csv"), drv.to_csv(header, records))
    header, table = abl.summarise(rows, list(variants))
    csv_uri, md_uri = join_uri(job.search_dir, "ablation.csv"), join_uri(job.search_dir, "ablation.md")
    md = drv.to_markdown(header, table)
    drv.write_text(csv_uri, drv.to_csv(header, table))
    drv.write_text(md_uri, md)
    chart = _chart(job, table)
    return {"table": table, "table_markdown": md, "csv": csv_uri, "markdown": md_uri,
            "chart": chart, "variants": {k: drv.SearchJob.param_overrides(job, {"variant": k})
                                         for k in variants}}


def _chart(job: drv.SearchJob, table: list[dict[str, Any]]) -> str:
    """The bar chart, drawn locally and copied to the search directory (which may be remote)."""
    import tempfile

    from raypipe.data.sources import get_filesystem, join_uri

    uri = join_uri(job.search_dir, "ablation.png")
    with tempfile.TemporaryDirectory() as d:
        local = str(Path(d) / "ablation.png")
        abl.bar_chart(table, local, f"Ablation of {job.name}")
        fs, path = get_filesystem(uri)
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(Path(local).read_bytes())
    return uri
