"""The Hydra apps ``archlab-train``, ``archlab-eval``, ``archlab-export`` and ``archlab-generate`` (thin:
compose, validate, delegate), and ``archlab-runs``.

Any bad input ends with one line on stderr, ``<app>: error: <reason>``, and exit code 2,
before anything is compiled or written (``HYDRA_FULL_ERROR=1`` shows the traceback). So do a
run directory held by a live run, a run without a usable checkpoint, and non-finite values
under ``run.on_nonfinite=stop``. SIGTERM or SIGINT makes ``archlab-train`` checkpoint at the
next step boundary and exit with code 0; the same command resumes the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import typing
from pathlib import Path
from typing import Any

import hydra
import hydra._internal.utils as hydra_utils
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from archlab.errors import ArchlabError, ConfigError
from archlab.schema import EvalConfig, ExportConfig, GenerateConfig, TrainConfig, register_configs

CONF_DIR = str(Path(os.environ.get("ARCHLAB_CONF", Path(__file__).resolve().parent / "conf")))
EXIT_BAD_INPUT = 2
_APP_NAME = ["archlab"]  # set by the entry point, so messages name the app even under ``python -c``
_NOISE = re.compile(r"^(object_type|reference_type|Set the environment variable HYDRA_FULL_ERROR)")


def one_line(error: BaseException) -> str:
    """Hydra and OmegaConf spread a message over several lines and a chain of causes; keep what a
    user needs on one line."""
    parts: list[str] = []
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).split("Config search path")[0]
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not _NOISE.match(ln.strip())]
        lines = [ln for ln in lines if not ln.startswith("To append to your config")]
        lines = [f"at {ln.split(':', 1)[1].strip()}" if ln.startswith("full_key:") else ln for ln in lines]
        for line in lines:
            if line not in parts and "$" not in line and line != "at":
                parts.append(line)
        error = None if isinstance(error, ArchlabError) else (error.__cause__ or error.__context__)
    text = "; ".join(p.rstrip(".:") for p in parts) or "unknown error"
    return re.sub(
        r"Available options in '(\w+)'; ((?:[\w.-]+; )*[\w.-]+)",
        lambda m: f"available {m.group(1)} options: " + m.group(2).replace("; ", ", "),
        text,
    )


def _remove_if_empty(directory: Path) -> None:
    """Hydra creates the output directory before the config is checked; an empty one is no result."""
    try:
        directory.rmdir()
    except OSError:
        pass  # not empty (or absent): leave it exactly as it is


def _fail(app: str, message: str) -> None:
    print(f"{app}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def _report_in_one_line(func, *args, **kwargs):
    """Replaces Hydra's ``run_and_report`` so composition errors also end in one line."""
    app = _APP_NAME[0]
    try:
        return func(*args, **kwargs)
    except SystemExit:
        raise
    except Exception as error:  # noqa: BLE001 - every failure becomes one line unless asked otherwise
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        cause = error
        while cause is not None and not isinstance(cause, ArchlabError):
            cause = cause.__cause__ or cause.__context__  # OmegaConf chains a resolver's error as context
        if cause is None:
            logging.getLogger("archlab").debug("error", exc_info=error)
        _fail(app, one_line(cause or error))


def dataclass_in(hint) -> type | None:
    """The dataclass a field's type names (through ``Optional``), or None."""
    if dataclasses.is_dataclass(hint):
        return hint
    dataclass_args = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
    return dataclass_args[0] if typing.get_origin(hint) is typing.Union and dataclass_args else None


def unknown_keys(node: Any, schema: type, prefix: str = "") -> list[str]:
    """Keys of the composed config that no field of ``schema`` reads (``+model.foo=1``), dotted.

    OmegaConf would drop them silently when it builds the dataclass; a key nothing reads is a
    mistake (a typo, a feature that does not exist), so it is refused instead.
    """
    if not isinstance(node, dict):
        return []  # an interpolation or null standing for the whole group
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key, value in node.items():
        if key not in names:
            found += _leaf_keys(value, f"{prefix}{key}")
        elif (sub := dataclass_in(hints[key])) is not None:
            found += unknown_keys(value, sub, f"{prefix}{key}.")
    return found


def _leaf_keys(value: Any, key: str) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaf_keys(v, f"{key}.{k}")]
    return [key]


def typed(cfg: DictConfig, schema):
    """The validated dataclass (``__post_init__`` checks run here); a key no field reads is refused."""
    if unknown := unknown_keys(OmegaConf.to_container(cfg, resolve=False), schema):
        also = f" (nor {', '.join(unknown[1:])})" if len(unknown) > 1 else ""
        raise ConfigError(f"{unknown[0]}{also} is not a setting: no field of the schema reads it "
                          "(--cfg job prints every setting)")
    try:
        obj = OmegaConf.to_object(cfg)
    except Exception as error:  # OmegaConf wraps errors raised in __post_init__
        cause = error
        while cause is not None and not isinstance(cause, ArchlabError):
            cause = cause.__cause__ or cause.__context__
        raise (cause or ArchlabError(one_line(error))) from error
    if not isinstance(obj, schema):
        raise ArchlabError(f"configuration did not compose into {schema.__name__}")
    return obj


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _train_app(cfg: DictConfig) -> float | None:
    _quiet_libraries()
    run_dir = Path(cfg.run.dir or HydraConfig.get().runtime.output_dir)
    try:
        config = typed(cfg, TrainConfig)
        from archlab.train.loop import train  # imported late: bad configs are refused before JAX loads

        summary = train(config, run_dir)
    except Exception as error:
        _remove_if_empty(run_dir)
        from archlab import sweeps

        refused = isinstance(error, ArchlabError)  # a bad input or a run that stopped itself, not a crash
        if not sweeps.in_multirun():
            if refused:
                _fail("archlab-train", one_line(error))
            raise
        # In a sweep a job fails alone: its line now, its row in the table at the end.
        reason = one_line(error) if refused else f"{type(error).__name__}: {error}"
        if not refused:
            logging.getLogger("archlab").exception("job in %s crashed", run_dir)
        print(f"archlab-train: error: {reason} (job {HydraConfig.get().job.num}, {run_dir})", file=sys.stderr)
        sweeps.note_failure(run_dir, reason)
        return float("nan")  # a failed trial to a sweeper that minimises the returned loss
    return summary.get("val/loss")  # the objective a Hydra sweeper (e.g. Optuna) minimises


def _delegate(cfg: DictConfig, app: str, schema: type, target: str) -> None:
    """Validate ``cfg`` against ``schema`` and call ``target`` (``"module:function"``, imported only then,
    so a bad config is refused before JAX loads); any archlab error is one line and exit 2."""
    import importlib

    _quiet_libraries()
    try:
        config = typed(cfg, schema)
        module, function = target.split(":")
        getattr(importlib.import_module(module), function)(config)
    except ArchlabError as error:
        _fail(app, one_line(error))


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
def _eval_app(cfg: DictConfig) -> None:
    _delegate(cfg, "archlab-eval", EvalConfig, "archlab.evaluate:evaluate")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def _export_app(cfg: DictConfig) -> None:
    _delegate(cfg, "archlab-export", ExportConfig, "archlab.export:export")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def _generate_app(cfg: DictConfig) -> None:
    _delegate(cfg, "archlab-generate", GenerateConfig, "archlab.generate_app:generate_from_run")


def _first_set(value, fallback):
    """``${archlab.or:a,b}``: ``a`` unless it is unset/null (``oc.select`` returns a null as is)."""
    return fallback if value in (None, "None", "null", "") else value


NOISY_LIBRARIES = ("absl", "jax", "orbax", "tensorstore", "datasets", "urllib3", "httpx", "filelock", "fsspec")


def _quiet_libraries() -> None:
    """Hydra sets the root logger to INFO; libraries' INFO chatter would bury the progress bar."""
    for name in NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _drop_closed_loop_noise(unraisable) -> None:
    """orbax reads a checkpoint through tensorstore on a private event loop; when one read fails (a
    corrupt file), the reads still in flight call back into the closed loop or raise as they are
    collected, and Python reports each as unraisable: hundreds of lines around the one that matters.
    ``Checkpointer.restore`` collects them itself; this drops any that outlive it (and only those)."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
    # Looked up, not imported: only a process that read a checkpoint has such noise (and no JAX
    # is loaded before a bad config is refused).
    reads = sys.modules.get("archlab.train.orbax_reads")
    if reads is not None and reads.is_abandoned_read(unraisable):
        return
    sys.__unraisablehook__(unraisable)


def prepare_hydra() -> None:
    """Register the schemas and archlab's resolver (idempotent): what composing a config needs."""
    register_configs()
    from archlab.help import register_resolvers as register_help
    from archlab.sweeps import register_resolver

    register_resolver()
    register_help()
    if not OmegaConf.has_resolver("archlab.or"):
        OmegaConf.register_new_resolver("archlab.or", _first_set)


def _main(app, name: str) -> None:
    _APP_NAME[0] = name
    sys.unraisablehook = _drop_closed_loop_noise
    prepare_hydra()
    hydra_utils.run_and_report = _report_in_one_line
    app()


def train_main() -> None:
    _main(_train_app, "archlab-train")


def eval_main() -> None:
    _main(_eval_app, "archlab-eval")


def export_main() -> None:
    _main(_export_app, "archlab-export")


def generate_main() -> None:
    _main(_generate_app, "archlab-generate")


def runs_main() -> None:
    """``archlab-runs``: the table of every run under one or more runs directories."""
    from archlab.runs_table import main

    main()
