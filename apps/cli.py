"""``synth``: one console script whose subcommands are Hydra apps (``synth render``, ``synth demo``).

Each subcommand composes its config first and instantiates every part, so a wrong key, a wrong type, an
unreadable mesh folder or an impossible camera constraint is reported in one line, naming the key or file,
before anything is written. Then Hydra runs the job(s) with the configured launcher.
"""

import re
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from synth.config import CONFIG_DIR
from synth.meshes import MeshFolderError
from synth.scene import SceneConfigError, SceneSamplingError

USAGE = """usage: synth COMMAND [key=value ...] [hydra flags]

commands:
  render   render a labelled dataset from a scene config (one Hydra job per shard)
  pretrain train one backbone on several objectives (synthetic heads, pretext, contrastive, adaptation)
  transfer score checkpoints and the random-init baseline on real tasks (probe, detection, segmentation, depth)
  demo     the main job on a small default: render, pretrain, transfer, print the results table
  experiment=NAME  run an experiment file of configs/experiment/ (e.g. experiment=ablation)

examples:
  synth render scene=room n_frames=64 out_dir=data/rooms
  synth render --cfg job            # print the composed config
  synth demo
  synth experiment=ablation
"""

DOMAIN_ERRORS = (SceneConfigError, SceneSamplingError, MeshFolderError, ValueError, FileNotFoundError)
CONFIG_ERRORS = (HydraException, OmegaConfBaseException, yaml.YAMLError, *DOMAIN_ERRORS)


class UsageError(Exception):
    """A bad command line or config; printed as one line, exit status 2."""


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """Compose a config as the app would see it (``hydra:`` interpolations included)."""
    with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3", job_name=config_name):
        cfg = hydra.compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def run_hydra(config_name: str, task: Callable[[DictConfig], object], args: list[str]) -> None:
    """Run ``task`` as the Hydra app ``config_name`` with command-line ``args``."""
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)
    argv = sys.argv
    sys.argv = [f"synth {config_name.removeprefix('synth_')}", *args]
    try:
        app()
    finally:
        sys.argv = argv


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


def checked(config_name: str, args: list[str], check: Callable[[DictConfig], object]) -> DictConfig | None:
    """Compose the config and run ``check`` on it; any config error becomes a one-line :class:`UsageError`.

    Returns None when ``args`` carry Hydra flags (--cfg, --info, --help, -m): Hydra then handles them itself.
    """
    if any(a.startswith("-") for a in args):
        return None
    try:
        cfg = compose(config_name, args)
        check(cfg)
    except CONFIG_ERRORS as error:
        raise UsageError(_explain(error)) from error
    return cfg


def render(args: list[str]) -> None:
    from apps.render import check_config, render_job, shard_count

    cfg = checked("synth_render", args, check_config)
    if cfg is None or cfg.shard is not None:
        run_hydra("synth_render", render_job, args)
    else:
        run_hydra("synth_render", render_job, ["--multirun", *args, f"shard=range(0,{shard_count(cfg)})"])


def pretrain(args: list[str]) -> None:
    from apps.pretrain import check_config, pretrain_job

    checked("synth_pretrain", args, check_config)
    run_hydra("synth_pretrain", pretrain_job, args)


def transfer(args: list[str]) -> None:
    from apps.transfer import check_config, transfer_job

    checked("synth_transfer", args, check_config)
    run_hydra("synth_transfer", transfer_job, args)


def demo(args: list[str]) -> None:
    """The main job on a small default (``configs/synth_demo.yaml``): render a few frames, pretrain with synthetic
    heads, a pretext task, a contrastive objective and the feature GAN, transfer to real tasks next to random
    init, and print the results table. Each stage is the single-stage command with derived overrides."""
    from apps.experiment import artefacts, demo_overrides

    cfg = checked("synth_demo", args, demo_overrides)
    if cfg is None:
        run_hydra("synth_demo", lambda c: print(c), args)
        return
    stages = demo_overrides(cfg)
    render(stages["render"])
    pretrain(stages["pretrain"])
    transfer(stages["transfer"])
    print("\nopen these:\n" + "\n".join(f"  {p}" for p in artefacts(Path(cfg.out_dir)) if p.exists()))


def experiment(args: list[str]) -> None:
    """``synth experiment=ablation``: every arm x seed pretrained and transferred at one budget, one table."""
    from apps.experiment import check_experiment, run_experiment

    cfg = checked("synth_experiment", args, check_experiment)
    if cfg is None:
        run_hydra("synth_experiment", lambda c: print(c), args)
        return
    if not cfg.arms:
        raise UsageError("no arms: pick an experiment, e.g. synth experiment=ablation")
    run_experiment(cfg)


COMMANDS = {"render": render, "pretrain": pretrain, "transfer": transfer, "demo": demo, "experiment": experiment}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command.startswith("experiment="):  # `synth experiment=ablation` reads as the experiment command
        command, args = "experiment", argv
    if command not in COMMANDS:
        print(f"synth: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](args)
    except UsageError as error:
        print(f"synth {command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
