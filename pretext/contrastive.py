r"""Contrastive instance discrimination on unlabelled images: SimCLR and MoCo v2, correct under DDP.

Both objectives make two augmented views of every image (:class:`~pretext.augment.ContrastiveAugment`, seeded
from the batch) and train the backbone so that a view's embedding picks out the other view of the same image among
many candidates. SimCLR (Chen et al., ICML 2020) takes the candidates from the batch, gathered over all processes;
MoCo v2 (He et al., CVPR 2020; Chen et al., arXiv 2003.04297, 2020) takes them from a queue of earlier keys made by a
slowly moving copy of the encoder.

Distributed training: the engine wraps the whole model in DistributedDataParallel, which averages gradients over
ranks. :func:`nt_xent_loss` averages over its local anchors and gathers embeddings with a gradient-carrying
all-gather, and with that choice the averaged gradients equal those of one process on the whole batch (see its
docstring). Getting this gather's backward wrong is a known trap: lightly's ``GatherLayer`` first returned only the
local gradient (lightly issue #1528) and its Barlow Twins loss later came out off by ``1/world_size`` (#1977). The
tests compare two gloo processes against one process on the concatenated batch.
"""

import math
from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_functional
import torch.nn.functional as F
from torch import Tensor, nn

from pretext.augment import ContrastiveAugment
from pretext.common import batch_generator
from synth.backbone import Backbone, resolve_stage

#: The domains an objective may consume.
_DOMAINS = ("synthetic", "real")


# ---------------------------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------------------------


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: Tensor) -> Tensor:
    r"""All-gather ``x`` over ranks, in rank order, keeping the graph: the inverse of splitting a batch over ranks.

    The backward pass sums, over all ranks, the gradients of their losses with respect to each slice and hands
    each rank the sum for its own slice (a reduce-scatter of the gradients), which is what
    :func:`torch.distributed.nn.functional.all_gather` does: rank :math:`r` receives
    :math:`\sum_{r'} \partial L_{r'} / \partial x_r`. Returning only the local rank's own gradient, as lightly's
    ``GatherLayer`` did before its fix (issue #1528), drops the terms from the other ranks' losses.

    Every rank must pass a tensor of the same shape. Without an initialised process group (or with one rank) it
    returns ``x`` itself.

    Shape:
        - Input: :math:`(B, *)`. Output: :math:`(W B, *)` for :math:`W` ranks, rank :math:`r`'s rows at
          :math:`[rB, (r+1)B)`.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return torch.cat(dist_functional.all_gather(x), dim=0)


@torch.no_grad()
def gather_without_grad(x: Tensor) -> Tensor:
    """All-gather ``x`` over ranks in rank order, detached; ``x`` itself on one process. Shape as
    :func:`gather_with_grad`."""
    _, world = rank_and_world()
    if world == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)


# ---------------------------------------------------------------------------------------------------------------
# NT-Xent
# ---------------------------------------------------------------------------------------------------------------


def nt_xent_logits(z1: Tensor, z2: Tensor, temperature: float = 0.2, gather: bool = True) -> tuple[Tensor, Tensor]:
    r"""The logits of SimCLR's NT-Xent loss for this rank's anchors, and the index of each anchor's positive.

    The embeddings are L2-normalised in float32. Anchors are this rank's :math:`2B` embeddings (views 1, then
    views 2); candidates are the :math:`2N` embeddings of all ranks when gathering (:math:`N = WB`; views 1 of all
    ranks, then views 2), else this rank's own. Each anchor's logit against itself is :math:`-\infty`, so it is
    never a candidate. Anchor :math:`i` of views 1 on rank :math:`r` has its positive at :math:`N + rB + i`,
    its own position at :math:`rB + i`.

    Args:
        z1: embeddings of the first views.
        z2: embeddings of the second views (row :math:`i` is the same image as in ``z1``).
        temperature: :math:`\tau`.
        gather: draw negatives from all ranks (:func:`gather_with_grad`) when a process group is initialised.

    Shape:
        - z1, z2: :math:`(B, D)`.
        - Output: logits :math:`(2B, 2N)` float32 and positives :math:`(2B,)` int64.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"nt_xent: z1 and z2 must be (B, D) of one shape, got {tuple(z1.shape)} and "
                         f"{tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"nt_xent: temperature must be > 0, got {temperature}")
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    rank, world = rank_and_world()
    batch = z1.shape[0]
    if gather and world > 1:
        all1, all2, offset = gather_with_grad(z1), gather_with_grad(z2), rank * batch
    else:
        all1, all2, offset = z1, z2, 0
    total = all1.shape[0]
    anchors = torch.cat([z1, z2])
    candidates = torch.cat([all1, all2])
    with _float32(anchors):
        logits = anchors @ candidates.T / temperature
    local = torch.arange(batch, device=z1.device) + offset
    own = torch.cat([local, local + total])
    positives = torch.cat([local + total, local])
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[torch.arange(2 * batch, device=z1.device), own] = True
    return logits.masked_fill(is_self, -math.inf), positives


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.2, gather: bool = True) -> Tensor:
    r"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., ICML 2020, their Eq. 1).

    With unit embeddings :math:`z`, an anchor :math:`i`, its positive :math:`p(i)` (the other view of the same
    image) and all other embeddings :math:`k \ne i` as candidates,

    .. math::
        \ell_i = -\log \frac{\exp(z_i^\top z_{p(i)} / \tau)}{\sum_{k \ne i} \exp(z_i^\top z_k / \tau)},
        \qquad L = \frac{1}{2B} \sum_{i \in \text{local anchors}} \ell_i.

    **Under DDP** (``gather=True``) the candidates are the gathered embeddings of all :math:`W` ranks, so each
    :math:`\ell_i` is the single-process value on the concatenated batch of :math:`N = WB` images; the loss is the
    mean over this rank's :math:`2B` anchors, so the mean of the ranks' losses is the single-process mean over
    :math:`2N` anchors. Gradients: :func:`gather_with_grad` hands rank :math:`r` the gradient
    :math:`\sum_{r'} \partial L_{r'} / \partial z_r` of all ranks' losses with respect to its own embeddings;
    DDP then averages the parameter gradients over ranks, giving
    :math:`\frac{1}{W}\sum_{r'} \partial L_{r'} / \partial\theta = \partial L_\text{single} / \partial\theta`.
    Had the loss been normalised by the global :math:`2N` anchors instead, the averaged gradients would be
    :math:`W` times too small. Equal local batch sizes are assumed (the engine's sampler gives them). With
    ``gather=False`` each rank contrasts only its own batch, a different (easier) loss.

    Args:
        z1: embeddings of the first views.
        z2: embeddings of the second views.
        temperature: :math:`\tau`.
        gather: gather negatives from all ranks when a process group is initialised.

    Shape:
        - z1, z2: :math:`(B, D)`, any float dtype. Output: scalar float32.

    Examples:
        >>> z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
        >>> nt_xent_loss(z1, z2, temperature=0.5).shape
        torch.Size([])
    """
    logits, positives = nt_xent_logits(z1, z2, temperature, gather=gather)
    return F.cross_entropy(logits, positives)


@torch.no_grad()
def _nt_xent_metrics(logits: Tensor, positives: Tensor, temperature: float) -> dict[str, Tensor]:
    """Mean cosine of the positives and of the negatives, and how often the positive has the top logit."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    is_positive = torch.zeros_like(logits, dtype=torch.bool)
    is_positive[rows, positives] = True
    is_negative = torch.isfinite(logits) & ~is_positive
    cosine = torch.where(torch.isfinite(logits), logits * temperature, 0.0)
    return {"pos_sim": cosine[rows, positives].mean(),
            "neg_sim": torch.where(is_negative, cosine, 0.0).sum() / is_negative.sum().clamp(min=1),
            "acc": (logits.argmax(dim=1) == positives).float().mean()}


# ---------------------------------------------------------------------------------------------------------------
# Heads and helpers
# ---------------------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Sequential):
    r"""Two-layer MLP projection head: ``Linear -> [BatchNorm1d] -> ReLU -> Linear``.

    SimCLR (Chen et al., ICML 2020) puts batch norm after the hidden layer; MoCo v2 (Chen et al., 2020) uses none.
    The hidden layer has no bias when batch norm follows it (the norm's shift replaces it).

    Args:
        in_dim: input features (the backbone stage's channels).
        hidden_dim: hidden width.
        out_dim: embedding size.
        batch_norm: batch norm after the hidden layer.

    Shape:
        - Input: :math:`(B, \mathrm{in\_dim})`. Output: :math:`(B, \mathrm{out\_dim})`.
    """

    def __init__(self, in_dim: int = 512, hidden_dim: int = 512, out_dim: int = 128, batch_norm: bool = True):
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
        super().__init__(*layers)


def _float32(like: Tensor) -> torch.autocast:
    """Autocast switched off on ``like``'s device: autocast would run a float32 matmul in bf16/fp16, too coarse
    for logits divided by a small temperature."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _unwrap(module: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        inner = getattr(module, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(module, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return module
        module = inner


def _check_domains(owner: str, domains: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    domains = tuple(domains)
    unknown = [d for d in domains if d not in _DOMAINS]
    if not domains or unknown or len(set(domains)) != len(domains):
        raise ValueError(f"{owner}: domains must be distinct names from {list(_DOMAINS)}, got {list(domains)}")
    return domains



def _pooled(backbone: nn.Module, views: Tensor, stage: str) -> Tensor:
    """Global-average-pooled ``stage`` features :math:`(B, C)` of ``views``."""
    return backbone(views, stages=[stage])[stage].mean(dim=(2, 3))


# ---------------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------------


class SimCLR(nn.Module):
    r"""SimCLR (Chen, Kornblith, Norouzi & Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", ICML 2020): two augmented views per image, NT-Xent over the gathered batch.

    Each image of a domain batch gets two views from :class:`~pretext.augment.ContrastiveAugment`, drawn from
    ``batch_generator(batch, "simclr")``; both go through the backbone in one pass (so batch norm sees all
    :math:`2B` views), are pooled at ``stage``, projected by a :class:`ProjectionHead` with batch norm, and scored
    by :func:`nt_xent_loss`. With several ``domains`` the engine calls the objective once per domain batch: each
    domain has its own loss (negatives come from the same domain) and all share the projection head, so rendered and
    real images are embedded in one space.

    Args:
        domains: the batches it consumes: ``"real"`` and/or ``"synthetic"``.
        backbone_arch: the backbone's architecture, to size the projection head.
        stage: the backbone stage pooled into the representation (``None``: the last). An earlier stage leaves
            the later ones without gradients, which DDP rejects unless ``find_unused_parameters`` is set.
        projection_dim: size of the embedding the loss is computed on.
        hidden_dim: hidden width of the projection head (2048 in the paper).
        temperature: :math:`\tau` of NT-Xent (0.1-0.5 in the paper).
        gather_distributed: contrast against the embeddings of all ranks under DDP (the paper's global batch).
        augment_size: side of the views.
        augment_scale: area range of the random resized crop.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)` normalised, ``seed`` :math:`(B,)` int64 on the CPU, optional
          ``with_metrics``.
        - **backbone**: the shared :class:`~synth.backbone.Backbone`.

    Shape:
        - Output: ``{"loss", "pos_sim", "neg_sim", "acc"}``, 0-dim float32 (only ``loss`` when
          ``batch["with_metrics"]`` is False). ``acc``: how often the positive has the highest logit among all
          candidates; the metrics cover this rank's anchors.

    Examples:
        >>> objective, backbone = SimCLR(augment_size=32), Backbone("resnet18")
        >>> batch = {"image": torch.randn(4, 3, 48, 48), "seed": torch.arange(4)}
        >>> sorted(objective(batch, backbone))
        ['acc', 'loss', 'neg_sim', 'pos_sim']
    """

    domains: tuple[str, ...] = ("real",)
    uses_features = False
    joint = False

    def __init__(self, domains: tuple[str, ...] = ("real",), backbone_arch: str = "resnet18",
                 stage: str | None = None, projection_dim: int = 128, hidden_dim: int = 512,
                 temperature: float = 0.2, gather_distributed: bool = True, augment_size: int = 64,
                 augment_scale: tuple[float, float] = (0.2, 1.0)):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SimCLR: temperature must be > 0, got {temperature}")
        self.domains = _check_domains("SimCLR", domains)
        self.backbone_arch = backbone_arch
        self.stage, channels = resolve_stage("SimCLR", backbone_arch, stage)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.augment = ContrastiveAugment(size=augment_size, scale=augment_scale)
        self.head = ProjectionHead(channels, hidden_dim, projection_dim, batch_norm=True)

    def forward(self, batch: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
        images = batch["image"]
        if images.shape[0] < 2:
            raise ValueError(f"SimCLR needs at least 2 images per batch (batch norm, negatives), got {images.shape[0]}")
        generator = batch_generator(batch, "simclr")
        views = torch.cat([self.augment(images, generator), self.augment(images, generator)])
        z1, z2 = self.head(_pooled(backbone, views, self.stage)).float().chunk(2)
        logits, positives = nt_xent_logits(z1, z2, self.temperature, gather=self.gather_distributed)
        loss = F.cross_entropy(logits, positives)
        if not batch.get("with_metrics", True):
            return {"loss": loss}
        return {"loss": loss, **_nt_xent_metrics(logits, positives, self.temperature)}


class MoCoV2(nn.Module):
    r"""MoCo v2: momentum contrast with a queue of negatives (He, Fan, Wu, Xie & Girshick, "Momentum Contrast for
    Unsupervised Visual Representation Learning", CVPR 2020; Chen, Fan, Girshick & He, "Improved Baselines with
    Momentum Contrastive Learning", arXiv 2003.04297, 2020).

    A query view :math:`x_q` goes through the online backbone and projection head, a key view :math:`x_k` of the
    same image through the key encoder (a momentum copy of both, no gradient). With unit embeddings :math:`q, k`
    and the queue's :math:`K` keys :math:`k_j` of earlier batches as negatives,

    .. math::
        L = -\frac{1}{B}\sum_{i} \log \frac{\exp(q_i^\top k_i / \tau)}{\exp(q_i^\top k_i / \tau)
            + \sum_{j=1}^{K} \exp(q_i^\top k_j / \tau)},

    after which the batch's keys replace the oldest :math:`N` of the queue. Under DDP the keys of all ranks are
    gathered (no gradient) before they are enqueued, in rank order, so every rank's queue is the same; each rank's
    loss is the mean over its :math:`B` queries and DDP's gradient average makes it the mean over the global
    batch. ``queue_size`` must be a multiple of the global batch :math:`N`, as in the official code.

    **Momentum update.** The engine has no per-step hook, so, as in the official implementation, the key encoder
    is updated at the start of each training-mode ``forward``, from the online weights current at that moment
    (those the optimizer has just stepped): :math:`\theta_k \leftarrow m\theta_k + (1 - m)\theta_q`, under
    ``no_grad``. It is skipped in eval mode, which leaves the queue alone as well. An objective is called once per
    domain batch, so MoCo takes exactly one domain: a second would update the key encoder twice per step.

    **Key encoder construction.** Constructors take plain keyword arguments only, and parameters created lazily
    on the first call would miss the optimizer and the checkpoint, so the key backbone is built in ``__init__`` as
    a fresh :class:`~synth.backbone.Backbone` of ``backbone_arch`` and the key head as a copy of the head. While the
    ``initialized`` buffer is 0 the first training forward copies the online weights and batch-norm buffers into it
    (momentum 0 for that step) and sets the flag, without a host sync. Before that, an eval-mode call uses the
    online encoder for the keys, which is what the key encoder will be. The key encoder's parameters have
    ``requires_grad=False``; the online backbone may arrive wrapped (DDP, ``torch.compile``).

    **Batch norm.** Keys are encoded with per-rank batch statistics, with no shuffling across ranks (He et al.'s
    "shuffling BN"). He et al. report that with batch norm, query and positive key share a batch's statistics,
    which leaks which key is the positive and lets the model "cheat"; shuffling sends each key through a
    different sub-batch than its query. Here ``bn_splits > 1`` does the single-process equivalent of the official
    CIFAR-10 demo (SplitBatchNorm with a batch shuffle for the keys): queries are encoded in ``bn_splits``
    consecutive sub-batches and keys in ``bn_splits`` sub-batches of a random permutation drawn from the batch's
    generator, then put back in order. ``bn_splits = 1`` (the default) encodes each side in one pass.

    Args:
        domains: the one domain it consumes, ``["real"]`` or ``["synthetic"]``.
        backbone_arch: the backbone's architecture (sizes the head, builds the key backbone).
        stage: the backbone stage pooled into the representation (``None``: the last; see :class:`SimCLR`).
        projection_dim: embedding size (128 in the paper).
        hidden_dim: hidden width of the MLP head (2048 in the paper).
        temperature: :math:`\tau` (0.2 in MoCo v2).
        momentum: :math:`m` of the key encoder (0.999 in the paper for 256-image batches over 200 epochs; 0.99
            suits short runs).
        queue_size: :math:`K`, the number of negative keys (65536 in the paper).
        bn_splits: sub-batches for batch norm (see above); must divide the local batch.
        augment_size: side of the views.
        augment_scale: area range of the random resized crop.

    Inputs: ``batch``, ``backbone``
        - **batch**: ``image`` :math:`(B, 3, H, W)` normalised, ``seed`` :math:`(B,)` int64 on the CPU, optional
          ``with_metrics``.
        - **backbone**: the shared :class:`~synth.backbone.Backbone` (the query encoder).

    Shape:
        - Output: ``{"loss", "pos_sim", "neg_sim", "acc"}``, 0-dim float32 (only ``loss`` when
          ``batch["with_metrics"]`` is False). ``acc``: how often the positive key beats every queued key.

    Attributes:
        queue: :math:`(K, D)` buffer of unit keys, initially random unit vectors (a fixed seed, the same on every
            rank).
        queue_ptr: 0-dim int64 buffer, the next row to overwrite.
        initialized: 0-dim int64 buffer, 1 once the key encoder holds a copy of the online encoder.

    Examples:
        >>> objective, backbone = MoCoV2(queue_size=16, augment_size=32), Backbone("resnet18")
        >>> batch = {"image": torch.randn(4, 3, 48, 48), "seed": torch.arange(4)}
        >>> sorted(objective(batch, backbone))
        ['acc', 'loss', 'neg_sim', 'pos_sim']
        >>> int(objective.queue_ptr)
        4
    """

    domains: tuple[str, ...] = ("real",)
    uses_features = False
    joint = False

    def __init__(self, domains: tuple[str, ...] = ("real",), backbone_arch: str = "resnet18",
                 stage: str | None = None, projection_dim: int = 128, hidden_dim: int = 512,
                 temperature: float = 0.2, momentum: float = 0.99, queue_size: int = 4096, bn_splits: int = 1,
                 augment_size: int = 64, augment_scale: tuple[float, float] = (0.2, 1.0)):
        super().__init__()
        self.domains = _check_domains("MoCoV2", domains)
        if len(self.domains) != 1:
            raise ValueError(f"MoCoV2: domains must name one domain (one queue, one momentum update per step), "
                             f"got {list(self.domains)}")
        if temperature <= 0:
            raise ValueError(f"MoCoV2: temperature must be > 0, got {temperature}")
        if not 0 <= momentum < 1:
            raise ValueError(f"MoCoV2: momentum must be in [0, 1), got {momentum}")
        if queue_size < 1 or bn_splits < 1:
            raise ValueError(f"MoCoV2: queue_size and bn_splits must be >= 1, got {queue_size}, {bn_splits}")
        self.backbone_arch = backbone_arch
        self.stage, channels = resolve_stage("MoCoV2", backbone_arch, stage)
        self.temperature = temperature
        self.momentum = momentum
        self.bn_splits = bn_splits
        self.augment = ContrastiveAugment(size=augment_size, scale=augment_scale)
        self.head = ProjectionHead(channels, hidden_dim, projection_dim, batch_norm=False)
        self.key_backbone = Backbone(arch=backbone_arch)
        self.key_head = ProjectionHead(channels, hidden_dim, projection_dim, batch_norm=False)
        self.key_head.load_state_dict(self.head.state_dict())
        for parameter in self.key_parameters():
            parameter.requires_grad_(False)
        # A fixed seed: every rank starts from the same queue, and reruns from the same weights.
        initial = torch.randn(queue_size, projection_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("queue", F.normalize(initial, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.int64))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.int64))

    def key_parameters(self) -> list[nn.Parameter]:
        """The key encoder's parameters (backbone, then head), in the order of :meth:`_online_parameters`."""
        return [*self.key_backbone.parameters(), *self.key_head.parameters()]

    def _online_parameters(self, online: nn.Module) -> list[nn.Parameter]:
        return [*online.parameters(), *self.head.parameters()]

    @torch.no_grad()
    def momentum_update(self, backbone: nn.Module) -> None:
        r""":math:`\theta_k \leftarrow m\theta_k + (1 - m)\theta_q` (He et al., CVPR 2020, Eq. 2), or a copy while
        ``initialized`` is 0 (then batch-norm buffers are copied too), and ``initialized`` is set to 1.

        Branch-free on the flag (the effective momentum is :math:`m \cdot \mathrm{initialized}`), so it costs
        no host sync on a GPU. ``forward`` calls it in training mode.
        """
        online = _unwrap(backbone)
        keys, queries = self.key_parameters(), self._online_parameters(online)
        key_buffers, query_buffers = list(self.key_backbone.buffers()), list(online.buffers())
        if len(keys) != len(queries) or any(k.shape != q.shape for k, q in zip(keys, queries, strict=True)) \
                or len(key_buffers) != len(query_buffers):
            raise ValueError(f"MoCoV2 was built for a {self.backbone_arch} backbone; the backbone passed has "
                             f"different parameters")
        started = self.initialized.bool()
        weight = 1.0 - self.momentum * self.initialized.to(torch.float32)
        for key, query in zip(keys, queries, strict=True):
            key.lerp_(query.detach(), weight.to(key.dtype))
        for key, query in zip(key_buffers, query_buffers, strict=True):
            key.copy_(torch.where(started, key, query))
        self.initialized.fill_(1)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the global batch of ``keys`` :math:`(N, D)` over the oldest :math:`N` rows of the queue, in order,
        and advance the pointer (modulo the queue size). ``forward`` gathers them over ranks first.

        Raises:
            ValueError: the queue size is not a multiple of :math:`N`.
        """
        size = self.queue.shape[0]
        if size % keys.shape[0]:
            raise ValueError(f"MoCoV2: queue_size {size} must be a multiple of the global batch {keys.shape[0]} "
                             f"(per-rank batch x ranks)")
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def _encode(self, backbone: nn.Module, head: nn.Module, views: Tensor) -> Tensor:
        """Unit embeddings :math:`(B, D)` float32, batch norm over ``bn_splits`` consecutive sub-batches."""
        features = torch.cat([_pooled(backbone, part, self.stage) for part in views.chunk(self.bn_splits)])
        return F.normalize(head(features).float(), dim=1)

    def forward(self, batch: Mapping[str, Tensor], backbone: nn.Module) -> dict[str, Tensor]:
        images = batch["image"]
        local_batch = images.shape[0]
        if local_batch % self.bn_splits:
            raise ValueError(f"MoCoV2: bn_splits {self.bn_splits} must divide the batch size {local_batch}")
        _, world = rank_and_world()
        if self.training and self.queue.shape[0] % (local_batch * world):
            raise ValueError(f"MoCoV2: queue_size {self.queue.shape[0]} must be a multiple of the global batch "
                             f"{local_batch * world} ({local_batch} per rank x {world} ranks)")
        generator = batch_generator(batch, "moco")
        query_views = self.augment(images, generator)
        key_views = self.augment(images, generator)
        if self.training:
            self.momentum_update(backbone)
            key_backbone, key_head = self.key_backbone, self.key_head
        elif bool(self.initialized):
            key_backbone, key_head = self.key_backbone, self.key_head
        else:
            key_backbone, key_head = _unwrap(backbone), self.head

        query = self._encode(backbone, self.head, query_views)
        with torch.no_grad():
            if self.bn_splits > 1:
                order = torch.randperm(local_batch, generator=generator).to(images.device)
                shuffled = self._encode(key_backbone, key_head, key_views[order])
                key = torch.empty_like(shuffled).index_copy_(0, order, shuffled)
            else:
                key = self._encode(key_backbone, key_head, key_views)
        # A copy: the enqueue below overwrites the queue in place, and backward needs the negatives it scored.
        negatives = self.queue.clone()
        positive_logit = (query * key).sum(dim=1, keepdim=True)
        with _float32(query):
            negative_logits = query @ negatives.T
        logits = torch.cat([positive_logit, negative_logits], dim=1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(local_batch, dtype=torch.int64, device=logits.device))
        if self.training:
            self.enqueue(gather_without_grad(key))
        if not batch.get("with_metrics", True):
            return {"loss": loss}
        with torch.no_grad():
            metrics = {"pos_sim": positive_logit.mean(), "neg_sim": negative_logits.mean(),
                       "acc": (logits.argmax(dim=1) == 0).float().mean()}
        return {"loss": loss, **metrics}


__all__ = [
    "MoCoV2",
    "ProjectionHead",
    "SimCLR",
    "gather_with_grad",
    "gather_without_grad",
    "nt_xent_logits",
    "nt_xent_loss",
    "rank_and_world",
]
