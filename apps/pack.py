"""``synth pack``: write the training-ready packed layout (:mod:`synth.packed`) beside rendered shards.

Each finished shard gets ``packed/``: one memory-mapped ``.npy`` per field and a ``pack.json`` completion mark keyed
by the SHA-256 of the shard's ``index.jsonl``. Rerunning is a no-op for shards whose pack is current, redoes a pack
that was interrupted or whose shard was re-rendered since, and skips (with a message) shards still being rendered.
Train on the packs with ``synth pretrain data.packed=true``.
"""

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from apps.launch import checked, run_hydra
from synth.packed import pack_dataset


@dataclass
class PackData:
    """Args:
        roots: Dataset folders written by ``synth render`` (the same key as ``synth pretrain``'s).
    """

    roots: list[str] = field(default_factory=lambda: ["data/tabletop"])


@dataclass
class PackApp:
    """``synth pack`` config."""

    data: PackData = field(default_factory=PackData)


ConfigStore.instance().store(name="pack_app_schema", node=PackApp)


def check_config(cfg: DictConfig) -> None:
    """Every root must hold rendered shards."""
    for root in cfg.data.roots:
        if not any(Path(root).glob("shard_*")):
            raise FileNotFoundError(f"data.roots: no rendered shard in {root}; run `synth render out_dir={root}` first")


def pack_job(cfg: DictConfig) -> dict[str, int]:
    """The Hydra task function: pack every shard of every root; prints one line per shard and a total."""
    counts = {"packed": 0, "current": 0, "skipped": 0}
    for root in cfg.data.roots:
        for status, message in pack_dataset(root):
            counts[status] += 1
            print(message)
    print(f"synth pack: {counts['packed']} shard(s) packed, {counts['current']} already up to date, "
          f"{counts['skipped']} skipped" + ("; rerun once their render has finished" if counts["skipped"] else ""))
    return counts


def command(args: list[str]) -> None:
    """``synth pack``: check that the roots hold shards, then pack them."""
    checked("synth_pack", args, check_config)
    run_hydra("synth_pack", pack_job, args)
