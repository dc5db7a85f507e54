"""`python -m finetune.sweep --config configs/sweep/X.yaml`: Ray Tune over fine-tuning settings, per dataset, with
ASHA; results.md, results.csv and a plot of every trial's validation curve.

    python -m finetune.sweep --config configs/sweep/benchmarks.yaml --datasets FI Emotion6 [--address auto]

Each trial is one fine-tuning run (finetune.engine; `job: temporal`: one temporal valence/arousal run,
finetune.temporal_job) in a Ray worker, reporting the validation metric every epoch;
a trial that raises is retried `max_failures` times, then marked failed — the sweep goes on and reports it.
"""
import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from runtime.atomic import atomic_write_bytes, atomic_write_text
from runtime.cli import HelpFormatter, parse_cli
from runtime.config import ConfigError, load_config
from runtime.logs import setup_logging

log = logging.getLogger("finetune.sweep")
SPACE_KINDS = ("loguniform", "uniform", "choice", "grid", "randint")


@dataclass
class SchedulerConfig:
    name: str = "asha"                      # asha or fifo
    max_t: int = 100                        # epochs
    grace_period: int = 5
    reduction_factor: int = 3


@dataclass
class SweepConfig:
    output_dir: str                                          # required
    datasets: Dict[str, str]                                 # required: name -> root (shards or image folder)
    job: str = "finetune"                                    # finetune (finetune/main.py) or temporal (clips)
    base_config: Optional[str] = None                        # a YAML of that job the trials start from
    base_overrides: List[str] = field(default_factory=list)  # applied after base_config, before the trial's values
    search_space: Dict[str, Dict[str, List[Any]]] = field(default_factory=dict)  # key -> {kind: [args]}
    num_samples: int = 4
    mode: str = "max"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources_per_trial: Dict[str, float] = field(default_factory=lambda: {"cpu": 1.0, "gpu": 0.0})
    max_failures: int = 1


# fine-tuning keys that name files: relative values are read from the directory the sweep was started in, not
# from the Ray worker's (each trial runs in a directory of its own, possibly on another node)
PATH_KEYS = ("encoder.checkpoint", "data.root", "data.cache", "temporal.stage1")


JOBS = {"finetune": ("finetune.config", "FinetuneConfig", "finetune.engine", "Finetuning"),
        "temporal": ("finetune.temporal_config", "TemporalConfig", "finetune.temporal_job", "TemporalRegression")}
JOB_NAMES = {"finetune": "fine-tuning", "temporal": "temporal"}


def job_classes(name: str):
    """(config class, job class) of a sweep's `job`."""
    import importlib
    if name not in JOBS:
        raise ConfigError(f"job: {name!r} is not one of {sorted(JOBS)}")
    config_module, config, job_module, job = JOBS[name]
    return getattr(importlib.import_module(config_module), config), getattr(importlib.import_module(job_module), job)


def absolute_value(key: str, value: Any, cwd: Path) -> Any:
    """A relative path given for one of PATH_KEYS, joined to `cwd`; any other value as it is."""
    if key in PATH_KEYS and isinstance(value, str) and value and value.lower() not in ("null", "none", "~") \
            and "://" not in value and not Path(value).is_absolute():
        return str(cwd / value)
    return value


def with_absolute_paths(cfg: SweepConfig, cwd: Path) -> SweepConfig:
    """base_overrides and searched values of path keys made absolute against `cwd` (the caller's directory)."""
    overrides = [f"{key}={absolute_value(key.strip(), value, cwd)}" if sep else key
                 for key, sep, value in (o.partition("=") for o in cfg.base_overrides)]
    space = {key: {kind: [absolute_value(key, v, cwd) for v in values] for kind, values in spec.items()}
             for key, spec in cfg.search_space.items()}
    return dataclasses.replace(cfg, base_overrides=overrides, search_space=space)


def check_space(cfg: SweepConfig) -> None:
    """Every searched key must be a fine-tuning config key, and each listed value (choice, grid) or bound must fit
    it; an encoder checkpoint must exist. An error names the key or value that does not, before Ray starts."""
    base = [*cfg.base_overrides, "run.output_dir=x", "data.dataset=x"]
    schema, _ = job_classes(cfg.job)
    try:
        base_cfg = load_config(schema, cfg.base_config, base)
    except ConfigError as e:
        raise ConfigError(f"base_overrides do not fit the {JOB_NAMES[cfg.job]} config: {e}") from None
    if base_cfg.encoder.checkpoint and not Path(base_cfg.encoder.checkpoint).exists():
        raise ConfigError(f"base_overrides: encoder.checkpoint={base_cfg.encoder.checkpoint} does not exist (relative "
                          f"paths are read from the directory the sweep starts in)")
    for key, spec in cfg.search_space.items():
        if len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
            raise ConfigError(f"search_space.{key}: expected one of {{{', '.join(SPACE_KINDS)}: [...]}}, got {spec}")
        kind, args = next(iter(spec.items()))
        for sample in args:
            try:
                load_config(schema, cfg.base_config, [*base, f"{key}={sample}"])
            except ConfigError as e:
                raise ConfigError(f"search_space: parameter {key!r} value {sample!r} does not fit the "
                                  f"{JOB_NAMES[cfg.job]} config: {e}") from None


def to_tune_space(space: Dict[str, Dict[str, List[Any]]]) -> Dict[str, Any]:
    from ray import tune
    makers = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
              "choice": tune.choice, "grid": tune.grid_search}
    return {key: (makers[kind](args) if kind in ("choice", "grid") else makers[kind](*args))
            for key, spec in space.items() for kind, args in spec.items()}


def run_trial(config: Dict[str, Any]) -> None:
    """The Ray Tune trainable: one run of the sweep's job with this trial's values, reporting val every epoch."""
    from ray import tune

    from finetune.data import patch_timm_posterize
    from runtime import distributed
    from runtime.launcher_watch import exit_with_launcher
    exit_with_launcher("ray", "the Ray node's raylet")  # a trial ends with the raylet that started it
    meta = config["__sweep"]
    params = {k: v for k, v in config.items() if k != "__sweep"}
    trial_dir = Path(meta["output_dir"]) / "trials" / meta["dataset"] / tune.get_context().get_trial_id()
    overrides = [*meta["base_overrides"], *(f"{k}={v}" for k, v in params.items()),
                 f"data.dataset={meta['dataset']}", f"data.root={meta['root']}", f"run.output_dir={trial_dir}"]
    schema, job_class = job_classes(meta["job"])
    cfg = load_config(schema, meta["base_config"], overrides)

    last: Dict[str, Any] = {}

    def report(epoch: int, val: Dict[str, Any]) -> None:
        row = {"val_metric": float(val[job.primary]), "epoch": epoch, "trial_dir": str(trial_dir),
               "node": socket.gethostname()}
        if epoch < cfg.train.epochs:
            tune.report(row)
        else:
            last.update(row)  # the last epoch is reported after the test: a scheduler may stop a trial at max_t
    patch_timm_posterize()
    env = distributed.init_distributed(distributed.resolve_env(), cfg.run.dist_timeout_s)
    job = job_class(cfg, env, on_epoch=report)
    result = job.run()
    if last:
        tune.report({**last, "test_metric": float(result["test"][result["primary_metric"]])})


def sweep_dataset(cfg: SweepConfig, dataset: str, root: str, address: Optional[str]):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    scheduler = ASHAScheduler(time_attr="epoch", max_t=cfg.scheduler.max_t, grace_period=cfg.scheduler.grace_period,
                              reduction_factor=cfg.scheduler.reduction_factor) \
        if cfg.scheduler.name == "asha" else FIFOScheduler()
    meta = {"dataset": dataset, "job": cfg.job, "root": str(Path(root).resolve()),
            "output_dir": str(Path(cfg.output_dir).resolve()),
            "base_config": str(Path(cfg.base_config).resolve()) if cfg.base_config else None,
            "base_overrides": cfg.base_overrides}
    tuner = tune.Tuner(
        tune.with_resources(run_trial, cfg.resources_per_trial),
        param_space={**to_tune_space(cfg.search_space), "__sweep": meta},
        tune_config=tune.TuneConfig(metric="val_metric", mode=cfg.mode, scheduler=scheduler,
                                    num_samples=cfg.num_samples),
        run_config=tune.RunConfig(name=dataset, storage_path=str(Path(cfg.output_dir, "ray").resolve()),
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures), verbose=0))
    return tuner.fit()


def collect(cfg: SweepConfig, dataset: str, grid) -> List[Dict[str, Any]]:
    """One row per trial: its values, status, epochs, best val and the test metric of its best-val weights."""
    rows = []
    for result in grid:
        params = {k: v for k, v in result.config.items() if k != "__sweep"}
        history = result.metrics_dataframe
        curve = [] if history is None or "val_metric" not in history else \
            list(zip(history["epoch"].tolist(), history["val_metric"].tolist()))
        trial_dir = (result.metrics or {}).get("trial_dir")
        metrics = {}
        if trial_dir and (Path(trial_dir) / "metrics.json").is_file():
            metrics = json.loads((Path(trial_dir) / "metrics.json").read_text())
        status = "failed" if result.error else ("completed" if metrics else "stopped early (ASHA)")
        rows.append({"dataset": dataset, "trial": Path(result.path).name, "status": status,
                     "node": (result.metrics or {}).get("node", ""),
                     "error": error_line(result.error) if result.error else "",
                     "params": params, "epochs": len(curve), "curve": curve,
                     "best_val": max((v for _, v in curve), default=None) if cfg.mode == "max" else
                     min((v for _, v in curve), default=None),
                     "test": metrics.get("test", {}).get(metrics.get("primary_metric", ""), None),
                     "primary": metrics.get("primary_metric") or (curve and "val_metric") or ""})
    return rows


class OneLineTrialErrors(logging.Filter):
    """Ray Tune logs each failed try of a trial with its whole remote traceback: one line here (the error is kept
    in the trial's error.txt, and results.md names it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            record.msg, record.args = f"{record.getMessage()}: {error_line(record.exc_info[1])}", ()
            record.exc_info, record.exc_text = None, None
        return True


def error_line(error: BaseException) -> str:
    """The exception's own last line ('ZeroDivisionError: ...'), without Ray's coloured wrapper."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    return next((line for line in reversed(lines) if line), "")[:200]


def write_reports(out: Path, rows: List[Dict[str, Any]], mode: str) -> Dict[str, Any]:
    """results.csv (every trial), results.md (best per dataset + every trial), val_curves.png."""
    keys = sorted({k for r in rows for k in r["params"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["dataset", "trial", "status", *keys, "epochs", "best_val", "test", "node", "error"])
    for r in rows:
        writer.writerow([r["dataset"], r["trial"], r["status"], *(r["params"].get(k) for k in keys), r["epochs"],
                         r["best_val"], r["test"], r["node"], r["error"]])
    atomic_write_text(out / "results.csv", buf.getvalue())
    best = {}
    for r in rows:
        if r["best_val"] is None or r["test"] is None:
            continue
        cur = best.get(r["dataset"])
        better = cur is None or (r["best_val"] > cur["best_val"] if mode == "max" else r["best_val"] < cur["best_val"])
        if better:
            best[r["dataset"]] = r
    lines = ["# Sweep results", "", "## Best configuration per dataset", "",
             "| dataset | metric | best val | test | config |", "|---|---|---|---|---|"]
    for dataset, r in sorted(best.items()):
        lines.append(f"| {dataset} | {r['primary']} | {r['best_val']:.4f} | {r['test']:.4f} | "
                     + ", ".join(f"{k}={v}" for k, v in sorted(r["params"].items())) + " |")
    lines += ["", "## Every trial", "", "| dataset | trial | status | " + " | ".join(keys) +
              " | epochs | best val | test |", "|---" * (6 + len(keys)) + "|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['trial']} | {r['status']}{': ' + r['error'] if r['error'] else ''} | "
                     + " | ".join(str(r["params"].get(k)) for k in keys)
                     + f" | {r['epochs']} | {_fmt(r['best_val'])} | {_fmt(r['test'])} |")
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    plot_curves(out / "val_curves.png", rows)
    return {d: {"best_val": r["best_val"], "test": r["test"], "params": r["params"]} for d, r in best.items()}


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def plot_curves(path: Path, rows: List[Dict[str, Any]]) -> None:
    from finetune.analysis import figure_png, pyplot
    plt = pyplot()
    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        for r in (r for r in rows if r["dataset"] == dataset):
            if r["curve"]:
                ax.plot(*zip(*r["curve"]), marker="o", label=f"{r['trial'][-12:]} ({r['status']})")
        ax.set_title(dataset), ax.set_xlabel("epoch"), ax.set_ylabel("val metric")
        if ax.get_legend_handles_labels()[0]:  # (a dataset whose every trial failed has no curve)
            ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write_bytes(path, figure_png(fig, dpi=80))


def connect(address: str, nodes: int, timeout_s: float) -> None:
    """Join an existing Ray cluster once its head answers and `nodes` nodes are alive (no fixed sleeps): a
    launcher starts the head, the workers and this driver at the same time."""
    import ray
    deadline = time.time() + timeout_s
    while True:
        try:
            ray.init(address=address, log_to_driver=False)
            break
        except ConnectionError as e:
            if time.time() > deadline:
                raise ConnectionError(f"no Ray head answered at {address} within {timeout_s:.0f} s: {e}") from None
            time.sleep(1)
    while True:
        alive = sum(1 for n in ray.nodes() if n["Alive"])
        if alive >= nodes:
            log.info("Ray cluster at %s: %d node(s) alive", address, alive)
            return
        if time.time() > deadline:
            ray.shutdown()
            raise TimeoutError(f"Ray cluster at {address}: {alive} of {nodes} nodes alive after {timeout_s:.0f} s")
        time.sleep(1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--datasets", nargs="+", help="a subset of the config's datasets")
    parser.add_argument("--address", help="an existing Ray cluster (e.g. auto); default: a local Ray")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray")
    parser.add_argument("--wait-nodes", type=int, default=0,
                        help="with --address: wait (up to --wait-s) until the cluster has this many nodes")
    parser.add_argument("--wait-s", type=float, default=300)
    try:
        cfg, args = parse_cli(SweepConfig, argv, description=__doc__, parser=parser)
        cfg = with_absolute_paths(cfg, Path.cwd())
        check_space(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    setup_logging()
    datasets = args.datasets or list(cfg.datasets)
    unknown = [d for d in datasets if d not in cfg.datasets]
    if unknown:
        print(f"error: datasets {unknown} are not in the sweep config ({', '.join(cfg.datasets)})", file=sys.stderr)
        return 2
    import ray
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep a local Ray on 127.0.0.1
    if args.address:
        connect(args.address, args.wait_nodes, args.wait_s)
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    logging.getLogger("ray.tune.execution.tune_controller").addFilter(OneLineTrialErrors())
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for dataset in datasets:
            log.info("sweeping %s (%d samples)", dataset, cfg.num_samples)
            rows += collect(cfg, dataset, sweep_dataset(cfg, dataset, cfg.datasets[dataset], args.address))
    finally:
        ray.shutdown()
    best = write_reports(out, rows, cfg.mode)
    print(json.dumps(best, indent=1))
    failed = [r for r in rows if r["status"] == "failed"]
    log.info("%d trials, %d failed; results in %s/results.md", len(rows), len(failed), out)
    if rows and len(failed) == len(rows):
        first = failed[0]
        log.error("every trial failed; the first (%s, %s): %s", first["dataset"], first["trial"], first["error"])
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
