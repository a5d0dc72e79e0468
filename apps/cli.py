"""``synth``: one console script whose subcommands are Hydra apps (``synth render``, ``synth demo``).

Each subcommand is the ``command`` function of its app module (:mod:`apps.render`, :mod:`apps.pretrain`,
:mod:`apps.transfer`, :mod:`apps.demo`, :mod:`apps.experiment`); :mod:`apps.launch` composes and checks its config
first, so a bad key or value is one line with exit status 2, before anything is written.
"""

import importlib
import os
import sys

from apps.launch import RunFailed, UsageError, one_line, verbose

USAGE = """usage: synth [--verbose] COMMAND [key=value ...] [hydra flags]

commands:
  render   render a labelled dataset from a scene config (one Hydra job per shard)
  pack     write the training-ready packed layout beside rendered shards (train on it with data.packed=true)
  pretrain train one backbone on several objectives (synthetic heads, pretext, contrastive, adaptation)
  transfer score checkpoints and the random-init baseline on real tasks (probe, detection, segmentation, depth)
  adapt-images  train the rendered-to-real translator (CycleGAN + OP-GAN); `adapt-images apply` translates a dataset
  demo     the main job on a small default: render, pretrain, transfer, print the results table
  experiment=NAME  run an experiment file of configs/experiment/ (e.g. experiment=ablation)

examples:
  synth render scene=room n_frames=64 out_dir=data/rooms
  synth render --cfg job            # print the composed config
  synth adapt-images apply checkpoint=runs/adapt_images source=data/tabletop out_dir=data/tabletop_real
  synth demo
  synth experiment=ablation
"""
#: Subcommand -> app module; imported on use, so ``synth render`` does not pay for torch's import.
COMMANDS = {"render": "apps.render", "pretrain": "apps.pretrain", "transfer": "apps.transfer", "demo": "apps.demo",
            "experiment": "apps.experiment", "adapt-images": "apps.adapt_images", "pack": "apps.pack"}
#: Commands that train: they keep freed heap memory (:func:`synth.runtime.keep_freed_memory`).
TRAINING_COMMANDS = ("pretrain", "transfer", "demo", "experiment", "adapt-images")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--verbose":  # tracebacks for run-time failures
        os.environ["SYNTH_VERBOSE"] = "1"
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command.startswith("experiment="):  # `synth experiment=ablation` reads as the experiment command
        command, args = "experiment", argv
    if command not in COMMANDS:
        print(f"synth: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if command in TRAINING_COMMANDS:
        from synth.runtime import keep_freed_memory

        keep_freed_memory()
    try:
        importlib.import_module(COMMANDS[command]).command(args)
    except UsageError as error:
        print(f"synth {command}: error: {error}", file=sys.stderr)
        return 2
    except RunFailed:  # each failure was printed as one line where it happened
        return 1
    except Exception as error:  # a run-time failure outside Hydra's jobs (e.g. a demo or experiment stage)
        if verbose():
            raise
        print(f"synth {command}: error: {one_line(error)} (synth --verbose {command} ... shows the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
