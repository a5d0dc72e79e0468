"""Running a Hydra app from the ``synth`` command: compose and check the config first, then hand it to Hydra.

Each subcommand composes its config first and instantiates every part, so a wrong key, a wrong type, an
unreadable mesh folder or an impossible camera constraint is reported in one line, naming the key or file,
before anything is written (exit status 2). Then Hydra runs the job(s) with the configured launcher; a job that
fails at run time (a locked shard, a full disk, a diverged loss) is reported in one line too (exit status 1),
with the traceback only under ``synth --verbose`` (or ``SYNTH_VERBOSE=1``, or Hydra's ``HYDRA_FULL_ERROR=1``).
"""

import importlib.util
import os
import re
import sys
from collections.abc import Callable

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from synth.config import CONFIG_DIR
from synth.meshes import MeshFolderError
from synth.scene import SceneConfigError, SceneSamplingError

DOMAIN_ERRORS = (SceneConfigError, SceneSamplingError, MeshFolderError, ValueError, FileNotFoundError)
CONFIG_ERRORS = (HydraException, OmegaConfBaseException, yaml.YAMLError, *DOMAIN_ERRORS)


class UsageError(Exception):
    """A bad command line or config; printed as one line, exit status 2."""


class RunFailed(Exception):
    """A job failed at run time; each failure was printed as one line (``failures``). Exit status 1."""

    def __init__(self, message: str, failures: list[str] | None = None):
        super().__init__(message)
        self.failures = failures if failures is not None else [message]


def verbose() -> bool:
    """Whether errors should keep their tracebacks (``synth --verbose``, ``SYNTH_VERBOSE=1``,
    ``HYDRA_FULL_ERROR=1``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in ("SYNTH_VERBOSE", "HYDRA_FULL_ERROR"))


def one_line(error: BaseException) -> str:
    """``Type: message`` on one line (the first line of a long message), for run-time failures."""
    text = " ".join(str(error).split()) or repr(error)
    return text if type(error).__module__ == "builtins" else f"{type(error).__name__}: {text}"


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose a config as the app would see it (``hydra:`` interpolations included)."""
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=config_name):
        cfg = hydra.compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_hydra(config_name: str, task: Callable[[DictConfig], object], args: list[str]) -> list:
    """Run ``task`` as the Hydra app ``config_name`` with command-line ``args``.

    A job that raises is reported as one line on stderr (``synth <app>: error: ...``) instead of Hydra's
    traceback, unless :func:`verbose`; the other jobs of a multirun go on.

    Returns:
        The return values of the jobs that ran in this process, in order.

    Raises:
        RunFailed: a job run in this process failed (it was printed already).
    """
    name = config_name.removeprefix("synth_")
    results, failures = [], []

    def guarded(cfg: DictConfig):
        try:
            value = task(cfg)
        except Exception as error:
            if verbose():
                raise
            line = one_line(error)
            print(f"synth {name}: error: {line}", file=sys.stderr, flush=True)
            failures.append(line)
            return None
        results.append(value)
        return value

    app = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(guarded)
    argv = sys.argv
    sys.argv = [f"synth {config_name.removeprefix('synth_')}", *args]
    try:
        app()
    finally:
        sys.argv = argv
    if failures:
        raise RunFailed("; ".join(failures), failures)
    return results


def _explain(error: BaseException) -> str:
    """One readable line that names the key and the config file."""
    while error.__cause__ is not None and isinstance(error.__cause__, DOMAIN_ERRORS):
        error = error.__cause__  # the constructor's own message, not Hydra's wrapper around it
    text = str(error)
    if error.__cause__ is not None and str(error.__cause__) not in text:
        text = f"{text}: {error.__cause__}"  # e.g. Hydra's "Could not override" and OmegaConf's reason why
    text = " ".join(line.strip() for line in text.splitlines() if line.strip())
    # Hydra names a config as 'group/name'; point at the file a user edits.
    match = re.search(r"In '([\w/]+)'", text)
    if match and (CONFIG_DIR / f"{match.group(1)}.yaml").exists():
        text += f" (file: {CONFIG_DIR / match.group(1)}.yaml)"
    return text


#: Launcher choices that come from an optional extra: (Hydra plugin module, extra).
LAUNCHER_EXTRAS: dict[str, tuple[str, str]] = {
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "slurm"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    "ray_cluster": ("hydra_plugins.hydra_ray_launcher", "ray"),
}


def require_launcher(args: list[str]) -> None:
    """A launcher picked on the command line whose plugin is not installed is one line naming the extra.

    Raises:
        UsageError: e.g. ``hydra/launcher=slurm`` without ``pip install -e '.[slurm]'``.
    """
    for arg in args:
        match = re.fullmatch(r"(?:override\s+)?hydra/launcher=(\w+)", arg.strip())
        if match and match.group(1) in LAUNCHER_EXTRAS:
            module, extra = LAUNCHER_EXTRAS[match.group(1)]
            if importlib.util.find_spec(module) is None:
                raise UsageError(f"hydra/launcher={match.group(1)} needs the [{extra}] extra: "
                                 f"pip install -e '.[{extra}]' (from the project folder)")


def checked(config_name: str, args: list[str], check: Callable[[DictConfig], object]) -> DictConfig | None:
    """Compose the config and run ``check`` on it; any config error becomes a one-line :class:`UsageError`.

    Returns None when ``args`` carry Hydra flags (--cfg, --info, --help, -m): Hydra then handles them itself.
    """
    require_launcher(args)
    if any(a.startswith("-") for a in args):
        return None
    try:
        cfg = compose(config_name, args)
        check(cfg)
    except CONFIG_ERRORS as error:
        raise UsageError(_explain(error)) from error
    return cfg
