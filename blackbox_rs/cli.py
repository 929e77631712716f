"""The ``blackbox-rs`` command: ``demo``, ``fit``, ``certify``, ``report``, and ``api <vendor>`` for hosted APIs
(:mod:`blackbox_rs.api`).

A run is described by a TOML file validated by pydantic (unknown keys are errors that name the key)::

    [connector]
    name = "torchscript"            # or "kserve_v2", ...; other keys are the connector's settings
    path = "model.pt"
    input_shape = [1, 28, 28]
    num_classes = 10

    [data]
    fit = "train.npz"               # x (N x C x H x W, float [0,1] or uint8), optional y
    certify = "test.npz"
    limit = 500

    [fit]
    strategy = "surrogate"
    budget = 100000

    [certify]
    sigma = 0.25
    n0 = 100
    n = 10000

    [run]
    out_dir = "runs/exp1"
    cache_dir = ".cache/blackbox-rs"

Flags override the file. Errors print one line (no traceback) and exit with the codes of
:mod:`blackbox_rs.exit_codes`, the same as every recipe's: 2 a user error, 3 the budget is spent (rerun
with a larger budget), 4 the vendor's quota, 5 a service failure after retries, 130 Ctrl-C; the same
command resumes without repeating queries.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from blackbox_rs import defaults
from blackbox_rs.errors import BlackBoxRSError, ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Certified robustness (randomized smoothing) for opaque image classifiers.")


def _version(value: bool) -> None:
    if value:
        from blackbox_rs._version import __version__

        typer.echo(f"blackbox-rs {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """Certified robustness (randomized smoothing) for opaque image classifiers."""


# ----------------------------------------------------------------------------------------------
# configuration
class ConnectorSection(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fit: Path | None = None
    certify: Path | None = None
    limit: int | None = Field(default=None, ge=1)


class FitSection(BaseModel):
    model_config = ConfigDict(extra="allow")  # the rest is validated as FitConfig
    strategy: str = "surrogate"
    budget: int | None = Field(default=None, ge=0)
    module: str = "dncnn"


class CertifySection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigma: float = Field(default=0.25, gt=0)
    n0: int = Field(default=defaults.N0, ge=1)
    n: int = Field(default=defaults.N, ge=1)
    alpha: float = Field(default=defaults.ALPHA, gt=0, lt=1)
    radii: list[float] = Field(default_factory=lambda: list(defaults.RADII))
    seed: int | None = Field(default=None, ge=0, description="noise seed; default: a fresh one from OS entropy, "
                             "recorded in the journal and read back on resume")
    batch_size: int | None = Field(default=None, ge=1)
    budget: int | None = Field(default=None, ge=0)


class RunSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out_dir: Path = Path("blackbox-rs-run")
    cache_dir: Path | None = None


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    connector: ConnectorSection
    data: DataSection = DataSection()
    fit: FitSection = FitSection()
    certify: CertifySection = CertifySection()
    run: RunSection = RunSection()


def _pydantic_message(exc: ValidationError, where: str) -> str:
    errs = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        errs.append(f"{loc}: {msg}")
    return f"{where}: " + "; ".join(errs)


def load_config(path: Path | None, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """Read and validate a TOML run file; ``overrides`` (from flags) win over the file."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config {path} is not valid TOML: {exc}") from exc
    for section, values in overrides.items():
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    if "connector" not in raw:
        raise ConfigError("no [connector] section: give a config file with the connector's name and settings")
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_pydantic_message(exc, str(path or "flags"))) from None


def _connector(cfg: RunConfig) -> Any:
    from blackbox_rs.connectors.registry import build_connector

    settings = dict(cfg.connector.model_extra or {})
    return build_connector(cfg.connector.name, settings)


def _fit_config(cfg: RunConfig) -> Any:
    from blackbox_rs.fitting.config import FitConfig

    extra = dict(cfg.fit.model_extra or {})
    try:
        return FitConfig(strategy=cfg.fit.strategy, **extra)
    except ValidationError as exc:
        raise ConfigError(_pydantic_message(exc, "[fit]")) from None


def _out_dir(path: Path) -> Path:
    from blackbox_rs.paths import ensure_writable_dir

    return ensure_writable_dir(path, "output directory", ConfigError)


def _engine(cfg: RunConfig, budget: int | None, connector: Any) -> Any:
    """The run's engine: creates the output folder, the query cache and the ledger (never for a dry run)."""
    from blackbox_rs.budget import QueryBudget
    from blackbox_rs.engine import QueryEngine

    out = _out_dir(cfg.run.out_dir)
    cache = cfg.run.cache_dir or (out / "cache")
    b = QueryBudget(max_queries=budget, ledger=out / "budget_ledger.json") if budget is not None else None
    return QueryEngine(connector, cache=cache / "queries", budget=b)


def _measured_speed(conn: Any, batch_size: int | None, queries: int, *, transform: Any = None,
                    what: str = "ETA {t} for the whole run") -> str:
    """``"; measured N images/s here (...), <what>"`` for a local, unpaid model, timed on a few real
    batches by :func:`~blackbox_rs.throughput.measure_throughput` (nothing charged, counted or cached);
    ``""`` for a remote or paid one (a dry run sends nothing to it)."""
    from blackbox_rs.fitting.timing import format_seconds
    from blackbox_rs.progress import format_rate
    from blackbox_rs.throughput import measure_throughput

    tp = measure_throughput(conn, batch_size=batch_size, transform=transform)
    if tp is None:
        return ""
    through = " through the module" if tp.includes_transform else ""
    return (f"; measured {format_rate(tp.images_per_s)} images/s on this machine ({tp.measured_batches} batches "
            f"of {tp.batch_size}{through}), " + what.format(t=format_seconds(tp.eta_seconds(queries))))


def journal_tag(transform: Any) -> str:
    """File tag of the classifier a journal certifies: ``bare`` (no module) or ``module-<12 hex of its
    digest>``, so two classifiers never share a journal or a report."""
    from blackbox_rs.binding import transform_identity

    ident = transform_identity(transform, require=True)
    if ident == "none":
        return "bare"
    import hashlib

    return "module-" + hashlib.sha256(ident.encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------------------------
# error handling
def _run(fn: Any) -> None:
    """Run a command body; map its errors to the exit codes of :mod:`blackbox_rs.exit_codes` (the same
    as every recipe's) with one redacted line on stderr."""
    from blackbox_rs.exit_codes import USER_ERROR, classify, one_line

    try:
        fn()
    except (KeyboardInterrupt, BlackBoxRSError) as exc:
        code, line = classify(exc)
        typer.echo(("\n" if isinstance(exc, KeyboardInterrupt) else "") + line, err=True)
        raise typer.Exit(code) from None
    except ValidationError as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        raise typer.Exit(USER_ERROR) from None


# ----------------------------------------------------------------------------------------------
# commands
@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option(help="where the report goes")] = Path("blackbox-rs-demo"),
    cache_dir: Annotated[Path | None, typer.Option(help="model/query cache (default: OUT_DIR/cache)")] = None,
    fit_budget: Annotated[int, typer.Option(help="black-box queries the fit may spend")] = 40_000,
    inputs: Annotated[int, typer.Option(help="held-out images to certify")] = 100,
    n: Annotated[int, typer.Option(help="estimation samples per certificate")] = 1000,
    quick: Annotated[bool, typer.Option(help="a much smaller run (seconds), for smoke tests")] = False,
) -> None:
    """Train a digits CNN, serve it over OIP v2 as a label-only API, fit a denoiser under a query
    budget, certify held-out images with and without it, and write a report."""

    def go() -> None:
        from blackbox_rs._demo.pipeline import DemoConfig, run_demo
        from blackbox_rs.progress import ProgressBar

        _out_dir(out_dir)
        cfg = DemoConfig(out_dir=out_dir, cache_dir=cache_dir, fit_budget=fit_budget, certify_inputs=inputs, n=n)
        if quick:
            cfg = cfg.model_copy(update={"base_epochs": 5, "fit_steps": 40, "pretrain_steps": 40,
                                         "fit_budget": min(fit_budget, 4000), "certify_inputs": min(inputs, 10),
                                         "n": min(n, 200), "n0": 20})
        bar = ProgressBar(budget=None)
        result = run_demo(cfg, event=bar)
        typer.echo("")
        typer.echo(f"base model: digits CNN, clean test accuracy {result.base_accuracy:.3f}, served on 127.0.0.1 "
                   "as a label-only OIP v2 endpoint")
        typer.echo(f"fit: {result.fit.queries:,} black-box queries, {result.fit.trainable_parameters:,} trainable "
                   f"parameters ({result.fit.stopped})")
        typer.echo(f"certified accuracy (sigma={cfg.sigma}, n0={cfg.n0}, n={cfg.n}, alpha={cfg.alpha}, "
                   f"{cfg.certify_inputs} images):")
        typer.echo(result.table)
        typer.echo(f"report: {result.report.summary}")
        if result.report.plot:
            typer.echo(f"plot:   {result.report.plot}")

    _run(go)


@app.command()
def fit(
    config: Annotated[Path, typer.Argument(help="TOML run file")],
    strategy: Annotated[str | None, typer.Option(help="denoise | surrogate | zeroth_order | passthrough")] = None,
    budget: Annotated[int | None, typer.Option(help="black-box queries the fit may spend")] = None,
    out_dir: Annotated[Path | None, typer.Option()] = None,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    dry_run: Annotated[bool, typer.Option(help="print the queries and cost, spend nothing")] = False,
) -> None:
    """Fit an input module in front of the configured model; saves OUT_DIR/smoother."""

    def go() -> None:
        from blackbox_rs.data_files import load_images
        from blackbox_rs.progress import ProgressBar
        from blackbox_rs.smoother import BlackBoxSmoother

        cfg = load_config(config, {"fit": {"strategy": strategy, "budget": budget, **({"seed": seed} if seed is not None else {})},
                                   "run": {"out_dir": out_dir, "cache_dir": cache_dir}})
        fc = _fit_config(cfg)
        if cfg.data.fit is None:
            raise ConfigError("[data] fit = <path> is required to fit")
        from blackbox_rs.fitting.pilot import plan_pilot
        from blackbox_rs.fitting.strategies import estimate_fit_queries, expected_fit_queries, get_strategy

        conn = _connector(cfg)
        info = conn.info
        x, y = load_images(cfg.data.fit, info.input_shape, cfg.data.limit, class_names=info.class_names)
        est = estimate_fit_queries(fc, len(x), cfg.fit.budget)
        exp = expected_fit_queries(fc, len(x), cfg.fit.budget)
        cost = est * info.cost_per_query
        if dry_run:  # nothing is created: no output folder, no cache, no ledger
            plan = plan_pilot(get_strategy(fc.strategy), fc, len(x), cfg.fit.budget)
            how = f"its pilot's {plan.config.patience} scoring rounds show no gain" if plan else "no scoring round shows a gain"
            early = f"; {exp:,} if {how} (early stop)" if exp < est else ""
            speed = "" if est == 0 else _measured_speed(
                conn, getattr(fc, "batch_size", None), est, what="so the model's answers to those queries take about {t}")
            typer.echo(f"dry run: fit '{fc.strategy}' on {len(x)} images would spend at most {est:,} queries "
                       f"(cost {cost:.4g}){early}{speed}; nothing was sent")
            return
        engine = _engine(cfg, None, conn)
        smoother = BlackBoxSmoother(engine, module=cfg.fit.module, sigma=cfg.certify.sigma)
        bar = ProgressBar(budget=cfg.fit.budget)
        report = smoother.fit((x, y) if y is not None else x, config=fc, budget=cfg.fit.budget,
                              checkpoint_dir=cfg.run.out_dir / "fit_checkpoint",
                              progress=lambda k, t, info: bar("fit", k, t, info))
        path = smoother.save(cfg.run.out_dir / "smoother")
        why = ("its pilot's scoring rounds showed no gain" if report.pilot is not None and not report.pilot.gained
               else "no scoring round showed a gain")
        saved = (f"; {report.queries_saved:,} queries not spent ({why})"
                 if report.stopped == "no_gain" and report.queries_saved else "")
        typer.echo(f"fit {report.stopped}: {report.steps_done}/{report.steps_total} steps, {report.queries:,} queries "
                   f"({report.cache_hits:,} cache hits), {report.trainable_parameters:,} trainable parameters{saved}")
        typer.echo(f"saved: {path}")

    _run(go)


@app.command()
def certify(
    config: Annotated[Path, typer.Argument(help="TOML run file")],
    module_dir: Annotated[Path | None, typer.Option(help="a saved smoother (from `fit`); default: none")] = None,
    sigma: Annotated[float | None, typer.Option()] = None,
    n0: Annotated[int | None, typer.Option()] = None,
    n: Annotated[int | None, typer.Option()] = None,
    alpha: Annotated[float | None, typer.Option()] = None,
    budget: Annotated[int | None, typer.Option(help="query budget of this run (persisted ledger)")] = None,
    out_dir: Annotated[Path | None, typer.Option()] = None,
    cache_dir: Annotated[Path | None, typer.Option()] = None,
    dry_run: Annotated[bool, typer.Option(help="print the queries and cost, spend nothing")] = False,
    ray: Annotated[str | None, typer.Option(help="certify on Ray workers: 'auto' (a local or running cluster) or "
                                                 "a cluster ADDRESS; one budget holds across all of them")] = None,
    ray_workers: Annotated[int, typer.Option(help="Ray workers (with --ray)")] = 2,
) -> None:
    """Certify the configured data set; resumable and budgeted. Each classifier (the bare model, or one
    fitted module, by its digest) gets its own journal OUT_DIR/certificates-<tag>.jsonl and report
    OUT_DIR/report-<tag>, so runs with and without a module never share a file."""

    def go() -> None:
        from blackbox_rs.data_files import load_images
        from blackbox_rs.progress import DatasetProgress, ProgressBar
        from blackbox_rs.reports import accuracy_table, write_report
        from blackbox_rs.smoother import BlackBoxSmoother

        cfg = load_config(config, {"certify": {"sigma": sigma, "n0": n0, "n": n, "alpha": alpha, "budget": budget},
                                   "run": {"out_dir": out_dir, "cache_dir": cache_dir}})
        c = cfg.certify
        if cfg.data.certify is None:
            raise ConfigError("[data] certify = <path> is required to certify")
        conn = _connector(cfg)
        info = conn.info
        x, y = load_images(cfg.data.certify, info.input_shape, cfg.data.limit, class_names=info.class_names)
        est = len(x) * (c.n0 + c.n + (0 if y is not None else 1))
        if dry_run:  # nothing is created: no output folder, no cache, no ledger
            from blackbox_rs.throughput import is_local_model

            transform = None
            if module_dir is not None and is_local_model(conn) and not info.cost_per_query:
                # the certified classifier is module + model: time both (an engine without cache or budget)
                transform = BlackBoxSmoother.load(module_dir, conn).transform
            # batches as certification sends them: batch_size (default: the model's max_batch), at most n
            speed = _measured_speed(conn, min(c.batch_size or info.max_batch, c.n), est, transform=transform,
                                    what="ETA {t} for the whole run" + (" in one process" if ray is not None else ""))
            typer.echo(f"dry run: certifying {len(x)} images (n0={c.n0}, n={c.n}) needs at most {est:,} queries "
                       f"(cost {est * info.cost_per_query:.4g}; cached answers are free){speed}; nothing was sent")
            return
        engine = _engine(cfg, c.budget, conn)
        if module_dir is not None:
            smoother = BlackBoxSmoother.load(module_dir, engine)
        else:
            smoother = BlackBoxSmoother(engine, module=None, sigma=c.sigma)
        bar = ProgressBar(budget=engine.budget)  # budget left from the persisted ledger, across runs
        tag = journal_tag(smoother.transform)
        journal = cfg.run.out_dir / f"certificates-{tag}.jsonl"
        executor = None
        if ray is not None:  # workers build their own connector from the [connector] table (secrets by env name)
            from blackbox_rs.distributed import ConnectorSpec, RayExecutor

            executor = RayExecutor(address=None if ray == "auto" else ray, num_workers=ray_workers,
                                   connector=ConnectorSpec(name=cfg.connector.name,
                                                           settings=dict(cfg.connector.model_extra or {})),
                                   module_dir=module_dir, cache=(cfg.run.cache_dir or (cfg.run.out_dir / "cache")) / "queries")
        res = smoother.certify_dataset(
            x, None if y is None else y.tolist(), n0=c.n0, n=c.n, alpha=c.alpha, sigma=c.sigma, seed=c.seed,
            batch_size=c.batch_size, radii=c.radii, output=journal,
            progress=DatasetProgress(bar, len(x), engine=engine), executor=executor,
        )
        name = "fitted module" if module_dir is not None else "no module"
        files = write_report({name: res}, cfg.run.out_dir / f"report-{tag}",
                             cost_per_query=engine.info.cost_per_query)
        typer.echo(accuracy_table({name: res}))
        typer.echo(f"certificates: {journal}")
        typer.echo(f"report: {files.summary}")

    _run(go)


@app.command()
def report(
    certificates: Annotated[list[Path], typer.Argument(help="JSONL files written by `certify` (one run each)")],
    out_dir: Annotated[Path, typer.Option(help="where the report goes")] = Path("blackbox-rs-report"),
    radii: Annotated[str, typer.Option(help="comma-separated radii")] = "0,0.25,0.5,0.75,1.0",
) -> None:
    """Rebuild the report (JSON, CSV, table, PNG, markdown) from certificate files, no queries."""

    def go() -> None:
        from blackbox_rs.reports import accuracy_table, load_run, write_report

        try:
            rs = [float(r) for r in radii.split(",") if r.strip()]
        except ValueError:
            raise ConfigError(f"--radii must be comma-separated numbers, got {radii!r}") from None
        runs = {path.stem: load_run(path, rs) for path in certificates}
        files = write_report(runs, _out_dir(out_dir))
        typer.echo(accuracy_table(runs, rs))
        typer.echo(f"report: {files.summary}")

    _run(go)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def api(
    ctx: typer.Context,
    vendor: Annotated[str, typer.Argument(help="huggingface | google-vision | aws-rekognition | azure-vision | "
                                               "azure-custom-vision | clarifai | openai-chat | tf-serving | torchserve")],
) -> None:
    """Certify a hosted API: `blackbox-rs api VENDOR [certify|labels|check-encoding] IMAGES [flags]`
    (`blackbox-rs api VENDOR certify --help` lists the flags)."""
    if vendor in ("-h", "--help"):
        from blackbox_rs.api.vendors import VENDORS

        typer.echo("usage: blackbox-rs api VENDOR [certify|labels|check-encoding] IMAGES [flags]\n\n"
                   "  certify         certify the images (default: the sequential test at --radius 0.25)\n"
                   "  labels          list the vendor's raw labels and write a proposed label map\n"
                   "  check-encoding  check that the image encoding leaves each clean answer unchanged\n\n"
                   "vendors:\n" + "\n".join(f"  {n:20s}{VENDORS.get(n).description}" for n in VENDORS.names())
                   + "\n\n`blackbox-rs api VENDOR ACTION --help` lists the flags.")
        return
    from blackbox_rs.api import main as api_main

    code = api_main(vendor, list(ctx.args))
    if code:
        raise typer.Exit(code)


def main() -> None:
    """Entry point of the ``blackbox-rs`` command."""
    import warnings

    # torch 2.15 deprecates TorchScript loading with a FutureWarning on every load: noise for CLI users
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.")
    app(prog_name="blackbox-rs")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
