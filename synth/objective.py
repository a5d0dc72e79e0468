"""The objective contract: what the engine asks of every loss it trains, stated once and checked at build time.

An objective is an ``nn.Module`` (a synthetic head, a pretext task, a contrastive loss, an adversary) with:

- ``domains``: the batches it consumes, a non-empty tuple of ``"synthetic"`` and/or ``"real"``;
- ``forward(batch, backbone) -> dict[str, Tensor]``: ``"loss"`` (a 0-dim tensor) plus any metrics. ``batch`` holds
  ``image`` :math:`(B, 3, H, W)` (ImageNet-normalised), the domain's labels, ``features`` (the backbone's stage
  outputs, computed once per domain when ``uses_features``), ``seed`` (per-sample seeds, CPU), ``step``,
  ``total_steps`` and ``with_metrics``;

and optionally:

- ``uses_features`` (default True): False when the objective runs the backbone on images of its own making
  (rotated copies, tiles, views), so the engine need not compute ``batch["features"]`` for it;
- ``joint`` (default False): True when ``forward`` takes ``{domain: batch}`` for all its domains in one call
  (an adversary comparing the domains);
- an **adversary** provides ``discriminator_parameters()`` and ``discriminator_loss(batches, backbone) -> dict``:
  the engine steps a second optimizer on those parameters, alternately with the main step (Ren & Lee, CVPR 2018);
- a **predictor** provides ``target`` (the label key it predicts) and ``predict(batch, backbone) -> Tensor``: the
  engine draws input / prediction / truth pictures for it.

:func:`objective_traits` checks an objective against this contract once, when the engine is built, and returns its
traits, so the training step never probes an object with ``hasattr``.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

#: The batch domains an objective may consume.
DOMAINS: tuple[str, ...] = ("synthetic", "real")


@runtime_checkable
class Objective(Protocol):
    """What every objective provides (see the module docstring for the batch it receives)."""

    domains: tuple[str, ...]

    def forward(self, batch: Mapping, backbone: nn.Module) -> dict[str, Tensor]: ...


@runtime_checkable
class Adversary(Protocol):
    """An objective with a discriminator that the engine trains with its own optimizer."""

    def discriminator_parameters(self) -> Iterable[nn.Parameter]: ...

    def discriminator_loss(self, batches: Mapping[str, Mapping], backbone: nn.Module) -> dict[str, Tensor]: ...


@runtime_checkable
class Predictor(Protocol):
    """An objective whose dense prediction can be drawn next to the label ``target`` of the batch."""

    target: str

    def predict(self, batch: Mapping, backbone: nn.Module) -> Tensor: ...


class ObjectiveContractError(TypeError):
    """An objective does not meet the contract; the message names the objective and what is missing."""


@dataclass(frozen=True)
class ObjectiveTraits:
    """How the engine drives one objective, derived once from :func:`objective_traits`."""

    domains: tuple[str, ...]
    uses_features: bool
    joint: bool
    adversary: bool
    predictor: bool


def objective_traits(name: str, objective: object) -> ObjectiveTraits:
    """Check ``objective`` against the contract and return its traits.

    Raises:
        ObjectiveContractError: naming the objective and the missing or malformed member.
    """
    where = f"objective {name!r} ({type(objective).__qualname__})"
    if not isinstance(objective, nn.Module):
        raise ObjectiveContractError(f"{where} must be a torch.nn.Module")
    domains = getattr(objective, "domains", None)
    if isinstance(domains, str) or not isinstance(domains, tuple | list) or not domains:
        raise ObjectiveContractError(f"{where} needs `domains`, a non-empty tuple of {DOMAINS}, got {domains!r}")
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ObjectiveContractError(f"{where}: unknown domains {unknown}; expected some of {DOMAINS}")
    flags = {}
    for flag, default in (("uses_features", True), ("joint", False)):
        flags[flag] = getattr(objective, flag, default)
        if not isinstance(flags[flag], bool):
            raise ObjectiveContractError(f"{where}: `{flag}` must be a bool, got {flags[flag]!r}")
    # hasattr, once: an optional member may be a property that raises AttributeError when switched off (e.g. the
    # inpainting adversary with adversarial_weight=0).
    adversary = [m for m in ("discriminator_parameters", "discriminator_loss") if hasattr(objective, m)]
    if len(adversary) == 1:
        missing = {"discriminator_parameters", "discriminator_loss"} - set(adversary)
        raise ObjectiveContractError(f"{where} has {adversary[0]} but not {missing.pop()}: an adversary needs both")
    predictor = [m for m in ("predict", "target") if hasattr(objective, m)]
    if len(predictor) == 1:
        missing = {"predict", "target"} - set(predictor)
        raise ObjectiveContractError(f"{where} has {predictor[0]} but not {missing.pop()}: a predictor needs both")
    return ObjectiveTraits(domains=tuple(domains), uses_features=flags["uses_features"], joint=flags["joint"],
                           adversary=bool(adversary), predictor=bool(predictor))


__all__ = ["DOMAINS", "Adversary", "Objective", "ObjectiveContractError", "ObjectiveTraits", "Predictor",
           "objective_traits"]
