r"""Adversarial domain adaptation: objectives that make the encoder's features of rendered and real images alike.

Two adversaries, both joint objectives of the engine (``joint = True``: ``forward`` receives
``{"synthetic": batch, "real": batch}`` and reads ``batch["features"][stage]``, the backbone's output computed once
per domain batch by the engine):

- :class:`FeatureGAN`, the feature-space GAN of Ren & Lee, "Cross-Domain Self-supervised Multi-task Feature Learning
  using Synthetic Imagery", CVPR 2018: a patch discriminator tells real from rendered feature maps and has its own
  optimizer (``discriminator_parameters`` / ``discriminator_loss``, stepped by the engine after the main step);
  the encoder is trained to make rendered features score as real.
- :class:`DANN`, the domain-adversarial network of Ganin et al., "Domain-Adversarial Training of Neural Networks",
  JMLR 2016: a domain classifier on pooled features, trained by the main optimizer through a gradient-reversal
  layer, so one backward pass trains the classifier to separate the domains and the encoder to confuse it.

Domain labels are 1 for real and 0 for synthetic throughout. Losses are float32 even under autocast. Nothing is
kept between calls except genuine model state (FeatureGAN's history pool, a registered buffer); the reversal
schedule reads ``batch["step"]`` and ``batch["total_steps"]``, and the history pool draws from
:func:`pretext.common.batch_generator`, so a resumed run computes what an uninterrupted one would.
"""

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.common import batch_generator
from synth.backbone import resolve_stage

#: Label of real features in every domain loss here (synthetic is 0).
REAL, SYNTHETIC = 1.0, 0.0


# ---------------------------------------------------------------------------------------------------------------
# Gradient reversal
# ---------------------------------------------------------------------------------------------------------------


class GradientReversal(torch.autograd.Function):
    r"""The gradient-reversal layer of Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation",
    ICML 2015: the identity forward, the gradient multiplied by :math:`-\lambda` backward.

    .. math::
        R_\lambda(x) = x, \qquad \frac{\partial R_\lambda}{\partial x} = -\lambda I.

    Use through :func:`grad_reverse`. :math:`\lambda` is an argument of every call, not a stored schedule.
    """

    @staticmethod
    def forward(ctx, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        # view_as: a new tensor node, so autograd calls our backward instead of passing the input's gradient through.
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        return grad_output * -ctx.coeff, None


def grad_reverse(x: Tensor, coeff: float = 1.0) -> Tensor:
    r"""Identity forward; the gradient times :math:`-` ``coeff`` backward (Ganin & Lempitsky, ICML 2015).

    Args:
        x: Any tensor.
        coeff: :math:`\lambda \ge 0`, the weight of the reversed gradient.

    Shape:
        - Input and output: any, the same.

    Examples:
        >>> x = torch.ones(3, requires_grad=True)
        >>> grad_reverse(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """
    return GradientReversal.apply(x, float(coeff))


def dann_coefficient(step: int, total_steps: int, gamma: float = 10.0, max_coeff: float = 1.0) -> float:
    r"""The reversal weight schedule of Ganin & Lempitsky (ICML 2015, Sec. 5; Ganin et al., JMLR 2016, Eq. 14).

    .. math::
        \lambda_p = \lambda_{\max}\left(\frac{2}{1 + \exp(-\gamma p)} - 1\right), \qquad
        p = \min\!\left(1, \frac{\mathrm{step}}{\mathrm{total\_steps}}\right),

    0 at the start, so the domain classifier's early, noisy gradients do not disturb the encoder, rising to
    :math:`\lambda_{\max}\tanh(\gamma/2) \approx \lambda_{\max}` at the end. A pure function of its arguments.

    Args:
        step: The current optimizer step (0-based).
        total_steps: Steps in the run.
        gamma: :math:`\gamma`, how fast the weight rises (10 in the papers).
        max_coeff: :math:`\lambda_{\max}`.

    Raises:
        ValueError: ``total_steps`` < 1 or ``step`` < 0.
    """
    if total_steps < 1:
        raise ValueError(f"dann_coefficient: total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"dann_coefficient: step must be >= 0, got {step}")
    progress = min(1.0, step / total_steps)
    return max_coeff * (2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0)


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------------------



def _domain_batches(owner: str, batches: Mapping[str, Mapping]) -> tuple[Mapping, Mapping]:
    missing = [d for d in ("synthetic", "real") if d not in batches]
    if missing:
        raise KeyError(f"{owner}: needs both domain batches, got {sorted(batches)} (missing {missing})")
    return batches["synthetic"], batches["real"]


def _stage_features(owner: str, batch: Mapping, backbone: nn.Module, stage: str, channels: int,
                    backbone_arch: str) -> Tensor:
    """``batch["features"][stage]`` (the engine's backbone pass), or the backbone on ``batch["image"]``."""
    features = batch.get("features")
    if features is None:
        features = backbone(batch["image"], stages=[stage])
    if stage not in features:
        raise KeyError(f"{owner}: batch['features'] lacks stage {stage!r} (has {sorted(features)})")
    value = features[stage]
    # Checked on the features rather than on backbone.arch, so a wrapped backbone (DDP, compile) works too.
    if value.dim() != 4 or value.shape[1] != channels:
        raise ValueError(f"{owner} was built for a {backbone_arch} backbone ({stage}: {channels} channels), got "
                         f"features of shape {tuple(value.shape)}")
    return value


def _balanced_accuracy(real_logits: Tensor, synthetic_logits: Tensor) -> Tensor:
    """Mean of the per-domain accuracies (a logit > 0 says real), so unequal patch counts weigh the same."""
    return 0.5 * ((real_logits > 0).float().mean() + (synthetic_logits < 0).float().mean())


# ---------------------------------------------------------------------------------------------------------------
# Feature GAN
# ---------------------------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    r"""A small fully convolutional discriminator scoring every location of a feature map (a PatchGAN over
    features, after Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks", CVPR 2017).

    3x3 convolution, LeakyReLU(0.2), 3x3 convolution, LeakyReLU(0.2), 1x1 convolution to one logit per location.
    Padding keeps the spatial size, so a 1x1 map (a ResNet's ``layer4`` on 32-pixel images) works too. No
    normalisation layer: batch statistics would mix the real and the synthetic batch's features.

    Args:
        in_channels: Channels of the feature map.
        channels: Width of the hidden layers.

    Inputs: ``features``, ``frozen``
        - **features**: :math:`(B, C, h, w)`.
        - **frozen**: Use detached weights, so the gradient reaches the features but never the discriminator
          (the encoder's side of the game).

    Shape:
        - Output: logits :math:`(B, 1, h, w)`, > 0 means real.
    """

    def __init__(self, in_channels: int = 512, channels: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.score = nn.Conv2d(channels, 1, kernel_size=1)

    def forward(self, features: Tensor, frozen: bool = False) -> Tensor:
        def weights(conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
            if frozen:
                return conv.weight.detach(), conv.bias.detach()
            return conv.weight, conv.bias

        x = F.leaky_relu(F.conv2d(features, *weights(self.conv1), padding=1), 0.2)
        x = F.leaky_relu(F.conv2d(x, *weights(self.conv2), padding=1), 0.2)
        return F.conv2d(x, *weights(self.score))


class FeatureGAN(nn.Module):
    r"""Feature-space GAN between rendered and real images (Ren & Lee, "Cross-Domain Self-supervised Multi-task
    Feature Learning using Synthetic Imagery", CVPR 2018).

    A patch discriminator :math:`D` (:class:`PatchDiscriminator`) on one backbone stage's feature map learns to tell
    real features (label 1) from rendered ones (label 0); the encoder learns to make rendered features score as real
    (the non-saturating generator loss of Goodfellow et al., NeurIPS 2014). With patch logits
    :math:`D(f)_{b,u}` and :math:`\ell(z, t) = \mathrm{BCE}(\sigma(z), t)` averaged over batch and locations:

    .. math::
        L_{\mathrm{enc}} = \ell\big(D(f_{\mathrm{syn}}), 1\big), \qquad
        L_D = \tfrac{1}{2}\Big(\ell\big(D(f_{\mathrm{real}}), 1 - s\big)
              + \ell\big(D(\tilde{f}_{\mathrm{syn}}), 0\big)\Big),

    where :math:`s` is one-sided label smoothing (Salimans et al., NeurIPS 2016) and :math:`\tilde{f}_{\mathrm{syn}}`
    is the synthetic batch with some examples swapped for older ones from a history pool (Shrivastava et al.,
    "Learning from Simulated and Unsupervised Images through Adversarial Training", CVPR 2017, as Ren & Lee's code
    does), so :math:`D` does not forget the encoder's earlier features and the game oscillates less.

    ``forward`` returns :math:`L_{\mathrm{enc}}` for the main optimizer; the gradient reaches the features but not
    :math:`D`, whose weights are detached there (the engine also keeps them out of the main optimizer).
    ``discriminator_loss`` returns :math:`L_D` on detached features for the engine's discriminator optimizer, which
    it steps after the main step (on the features computed before that step).

    History pool: ``history_size`` past discriminator inputs, a registered buffer (checkpointed). Each synthetic
    example, once the pool is full, is with probability 1/2 swapped with a uniformly drawn pool entry (the entry
    goes to :math:`D`, the example into the pool), as in the image pool of Zhu et al. (CycleGAN, ICCV 2017). The
    draws come from :func:`pretext.common.batch_generator`. The pool holds feature maps of one size, fixed by the
    first batch: a run with a history pool needs one synthetic image size throughout (``history_size=0`` lifts
    that). The two domains may differ in size; :math:`D` is fully convolutional.

    Args:
        backbone_arch: The backbone's architecture, to size :math:`D`.
        stage: The backbone stage :math:`D` looks at; ``None`` means the last.
        channels: Width of :math:`D`.
        history_size: Feature maps in the history pool; 0 disables it.
        label_smoothing: :math:`s`, on :math:`D`'s real labels only.

    Inputs: ``batches``, ``backbone``
        - **batches**: ``{"synthetic": batch, "real": batch}``, each with ``features`` (``{stage: (B, C, h, w)}``,
          the engine's backbone pass) or ``image`` :math:`(B, 3, H, W)`; ``seed`` (per-sample seeds, for the pool);
          optional ``with_metrics``.
        - **backbone**: The shared :class:`~synth.backbone.Backbone`, used when ``features`` is absent.

    Shape:
        - Output of ``forward``: ``{"loss"}`` plus ``"disc_acc"`` (:math:`D`'s accuracy on this batch, the mean of
          the two domains' patch accuracies) when ``with_metrics``; 0-dim float32.
        - Output of ``discriminator_loss``: ``{"loss", "acc", "real_score", "fake_score"}``, 0-dim float32; the
          scores are mean :math:`\sigma(D)` on the real and on the (pool-mixed) synthetic input.

    Examples:
        >>> from synth.backbone import Backbone
        >>> backbone, gan = Backbone("resnet18"), FeatureGAN(stage="layer3", channels=32, history_size=4)
        >>> batches = {d: {"image": torch.randn(2, 3, 32, 32), "seed": torch.tensor([1, 2])}
        ...            for d in ("synthetic", "real")}
        >>> sorted(gan(batches, backbone))
        ['disc_acc', 'loss']
        >>> sorted(gan.discriminator_loss(batches, backbone))
        ['acc', 'fake_score', 'loss', 'real_score']
    """

    #: The batches this objective consumes, all in one call.
    domains: tuple[str, ...] = ("synthetic", "real")
    joint = True
    uses_features = True

    def __init__(self, backbone_arch: str = "resnet18", stage: str | None = None, channels: int = 256,
                 history_size: int = 128, label_smoothing: float = 0.0):
        super().__init__()
        if history_size < 0:
            raise ValueError(f"FeatureGAN: history_size must be >= 0, got {history_size}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"FeatureGAN: label_smoothing must be in [0, 1), got {label_smoothing}")
        self.backbone_arch = backbone_arch
        self.stage, self.in_channels = resolve_stage("FeatureGAN", backbone_arch, stage)
        self.history_size = history_size
        self.label_smoothing = label_smoothing
        self.discriminator = PatchDiscriminator(self.in_channels, channels)
        if history_size:
            # Empty until the first batch fixes the feature map's size; resized in place (not reassigned), so
            # DDP's reference to the buffer stays valid, and resized before loading a checkpoint.
            self.register_buffer("history", torch.zeros(0))
            self.register_buffer("history_count", torch.zeros((), dtype=torch.long))
        self._count = 0  # history_count's value on the host: reading the buffer every step would sync the device

    def discriminator_parameters(self) -> list[nn.Parameter]:
        """The parameters of :math:`D`, for the engine's discriminator optimizer."""
        return list(self.discriminator.parameters())

    def stage_features(self, batch: Mapping, backbone: nn.Module) -> Tensor:
        """The batch's feature map at :attr:`stage`, :math:`(B, C, h, w)`, still attached to the graph."""
        return _stage_features("FeatureGAN", batch, backbone, self.stage, self.in_channels, self.backbone_arch)

    def forward(self, batches: Mapping[str, Mapping], backbone: nn.Module) -> dict[str, Tensor]:
        synthetic_batch, real_batch = _domain_batches("FeatureGAN", batches)
        synthetic = self.stage_features(synthetic_batch, backbone)
        logits = self.discriminator(synthetic, frozen=True).float()
        loss = F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, REAL))
        if not synthetic_batch.get("with_metrics", True):
            return {"loss": loss}
        with torch.no_grad():
            real_logits = self.discriminator(self.stage_features(real_batch, backbone)).float()
            return {"loss": loss, "disc_acc": _balanced_accuracy(real_logits, logits)}

    def discriminator_loss(self, batches: Mapping[str, Mapping], backbone: nn.Module) -> dict[str, Tensor]:
        """:math:`L_D` on detached features; updates the history pool. See the class docstring."""
        synthetic_batch, real_batch = _domain_batches("FeatureGAN", batches)
        with torch.no_grad():  # only reached without precomputed features; the backbone is not trained here
            real = self.stage_features(real_batch, backbone).detach()
            fake = self.stage_features(synthetic_batch, backbone).detach()
            if self.history_size:
                fake = self.mix_history(fake, batch_generator(synthetic_batch, salt="feature_gan/history"))
        real_logits = self.discriminator(real).float()
        fake_logits = self.discriminator(fake).float()
        real_loss = F.binary_cross_entropy_with_logits(real_logits, torch.full_like(real_logits,
                                                                                     REAL - self.label_smoothing))
        fake_loss = F.binary_cross_entropy_with_logits(fake_logits, torch.full_like(fake_logits, SYNTHETIC))
        real_logits, fake_logits = real_logits.detach(), fake_logits.detach()
        return {"loss": 0.5 * (real_loss + fake_loss), "acc": _balanced_accuracy(real_logits, fake_logits),
                "real_score": real_logits.sigmoid().mean(), "fake_score": fake_logits.sigmoid().mean()}

    @torch.no_grad()
    def mix_history(self, features: Tensor, generator: torch.Generator) -> Tensor:
        """The discriminator's synthetic input: ``features`` with examples swapped for pool entries; updates the pool.

        Examples fill the pool in order until it is full; afterwards each one, with probability 1/2, takes a
        uniformly drawn pool entry's place in the pool and sends that entry to the discriminator instead
        (Shrivastava et al., CVPR 2017; Zhu et al., ICCV 2017). The draws (a coin and a slot per example) are made
        on the CPU with ``generator`` whether or not the pool is full, so the stream does not depend on the pool.

        Args:
            features: Detached synthetic feature maps.
            generator: CPU generator, from :func:`pretext.common.batch_generator`.

        Shape:
            - features and output: :math:`(B, C, h, w)`; the output in the dtype of ``features``.

        Raises:
            RuntimeError: the pool is disabled (``history_size=0``).
            ValueError: ``features`` differ in shape from the maps already in the pool.
        """
        if not self.history_size:
            raise RuntimeError("FeatureGAN: mix_history needs a history pool (history_size > 0)")
        entry = tuple(features.shape[1:])
        if self.history.numel() == 0:
            self.history.resize_(self.history_size, *entry).zero_()
        elif tuple(self.history.shape[1:]) != entry:
            raise ValueError(
                f"FeatureGAN: the history pool holds {self.stage} feature maps of shape {tuple(self.history.shape[1:])}"
                f" but got {entry}; the pool needs one synthetic image size throughout a run (set history_size=0 "
                f"to train with varying sizes)")
        batch = features.shape[0]
        coins = torch.rand(batch, generator=generator).tolist()
        slots = torch.randint(self.history_size, (batch,), generator=generator).tolist()
        # The example-by-example rule, planned on the host and applied with three indexed copies (a Python loop of
        # per-example copies costs milliseconds of kernel launches on a GPU). held[slot] = the example that the
        # slot holds once this batch is through; slots not in it keep their pool entry.
        n_fill = min(batch, self.history_size - self._count)
        held = {self._count + i: i for i in range(n_fill)}
        from_pool, from_batch = [], []  # (example, slot whose old entry it gets), (example, earlier example)
        for i in range(n_fill, batch):  # the pool is full from here on
            if coins[i] < 0.5:
                slot = slots[i]
                if slot in held:
                    from_batch.append((i, held[slot]))
                else:
                    from_pool.append((i, slot))
                held[slot] = i
        mixed = features.clone()
        device = features.device
        if from_pool:  # read before the pool is written
            rows, pool_slots = (torch.tensor(column, device=device) for column in zip(*from_pool, strict=True))
            mixed[rows] = self.history[pool_slots].to(mixed.dtype)
        if from_batch:
            rows, sources = (torch.tensor(column, device=device) for column in zip(*from_batch, strict=True))
            mixed[rows] = features[sources]
        if held:
            written, sources = (torch.tensor(column, device=device) for column in zip(*held.items(), strict=True))
            self.history[written] = features[sources].to(self.history.dtype)
        self._count += n_fill
        self.history_count.fill_(self._count)
        return mixed

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The pool's size is fixed by the first batch; give the empty buffer the checkpoint's shape before loading.
        stored = state_dict.get(prefix + "history")
        if self.history_size and stored is not None and stored.shape != self.history.shape:
            self.history.resize_(stored.shape)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.history_size:
            self._count = int(self.history_count)


# ---------------------------------------------------------------------------------------------------------------
# DANN
# ---------------------------------------------------------------------------------------------------------------


class DANN(nn.Module):
    r"""Domain-adversarial training (Ganin et al., "Domain-Adversarial Training of Neural Networks", JMLR 2016).

    Globally average-pooled features of one stage go through a gradient-reversal layer :math:`R_\lambda`
    (:func:`grad_reverse`) into an MLP domain classifier :math:`G_d` (two hidden ReLU layers, one logit, > 0 means
    real). With :math:`\ell` the binary cross-entropy averaged over a domain's examples,

    .. math::
        L = \tfrac{1}{2}\Big(\ell\big(G_d(R_\lambda(\bar{f}_{\mathrm{syn}})), 0\big)
            + \ell\big(G_d(R_\lambda(\bar{f}_{\mathrm{real}})), 1\big)\Big),

    the mean over both domains' examples when the batches are of equal size. Minimising :math:`L` with the main
    optimizer trains :math:`G_d` to separate the domains while the encoder receives :math:`-\lambda` times the
    gradient, i.e. learns to confuse it. :math:`\lambda` follows :func:`dann_coefficient` of ``batch["step"]`` and
    ``batch["total_steps"]`` (no counter is kept). There is no dropout in :math:`G_d` (it would draw from the global
    RNG) and no separate optimizer.

    Args:
        backbone_arch: The backbone's architecture, to size the classifier.
        stage: The backbone stage to pool; ``None`` means the last.
        hidden: Width of the classifier's hidden layers.
        gamma: :math:`\gamma` of the schedule.
        max_coeff: :math:`\lambda_{\max}` of the schedule.

    Inputs: ``batches``, ``backbone``
        - **batches**: ``{"synthetic": batch, "real": batch}``, each with ``features`` or ``image``, and ``step``,
          ``total_steps`` (ints, set by the engine); optional ``with_metrics``.
        - **backbone**: The shared :class:`~synth.backbone.Backbone`, used when ``features`` is absent.

    Shape:
        - Output: ``{"loss", "coeff"}`` plus ``"domain_acc"`` (the mean of the two domains' accuracies) when
          ``with_metrics``; 0-dim float32.

    Examples:
        >>> from synth.backbone import Backbone
        >>> backbone, dann = Backbone("resnet18"), DANN(hidden=32)
        >>> batches = {d: {"image": torch.randn(2, 3, 32, 32), "step": 10, "total_steps": 100}
        ...            for d in ("synthetic", "real")}
        >>> sorted(dann(batches, backbone))
        ['coeff', 'domain_acc', 'loss']
    """

    domains: tuple[str, ...] = ("synthetic", "real")
    joint = True
    uses_features = True

    def __init__(self, backbone_arch: str = "resnet18", stage: str | None = None, hidden: int = 256,
                 gamma: float = 10.0, max_coeff: float = 1.0):
        super().__init__()
        self.backbone_arch = backbone_arch
        self.stage, self.in_channels = resolve_stage("DANN", backbone_arch, stage)
        self.gamma = gamma
        self.max_coeff = max_coeff
        self.classifier = nn.Sequential(
            nn.Linear(self.in_channels, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, 1),
        )

    def coefficient(self, batch: Mapping) -> float:
        """:math:`\\lambda` for this batch, from its ``step`` and ``total_steps``."""
        missing = [k for k in ("step", "total_steps") if k not in batch]
        if missing:
            raise KeyError(f"DANN: the batch lacks {missing} (the engine sets them; the reversal weight follows them)")
        return dann_coefficient(int(batch["step"]), int(batch["total_steps"]), gamma=self.gamma,
                                max_coeff=self.max_coeff)

    def forward(self, batches: Mapping[str, Mapping], backbone: nn.Module) -> dict[str, Tensor]:
        synthetic_batch, real_batch = _domain_batches("DANN", batches)
        coeff = self.coefficient(synthetic_batch)
        logits = {}
        for name, batch in (("synthetic", synthetic_batch), ("real", real_batch)):
            features = _stage_features("DANN", batch, backbone, self.stage, self.in_channels, self.backbone_arch)
            pooled = grad_reverse(features.mean(dim=(2, 3)), coeff)
            logits[name] = self.classifier(pooled).float().squeeze(1)
        synthetic, real = logits["synthetic"], logits["real"]
        loss = 0.5 * (F.binary_cross_entropy_with_logits(synthetic, torch.full_like(synthetic, SYNTHETIC))
                      + F.binary_cross_entropy_with_logits(real, torch.full_like(real, REAL)))
        # A fill, not torch.tensor(coeff, device=...): no host-to-device copy on every step.
        out = {"loss": loss, "coeff": torch.full((), coeff, dtype=torch.float32, device=loss.device)}
        if synthetic_batch.get("with_metrics", True):
            out["domain_acc"] = _balanced_accuracy(real.detach(), synthetic.detach())
        return out


__all__ = ["DANN", "FeatureGAN", "GradientReversal", "PatchDiscriminator", "dann_coefficient", "grad_reverse"]
