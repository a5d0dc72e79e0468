"""The objective contract (synth.objective): every shipped objective meets it, and a broken one is named."""

import pytest
import torch
from torch import nn

from pretext.generative import Inpainting
from pretext.synthetic import DepthHead
from synth.objective import ObjectiveContractError, objective_traits


class _Loss(nn.Module):
    domains = ("real",)

    def forward(self, batch, backbone):
        return {"loss": torch.zeros(())}


def test_traits_of_shipped_objectives():
    depth = objective_traits("depth", DepthHead())
    assert depth.domains == ("synthetic",) and depth.predictor and not depth.adversary and not depth.joint
    assert depth.uses_features
    plain = objective_traits("inpainting", Inpainting(adversarial_weight=0.0))
    assert not plain.adversary and plain.predictor and not plain.uses_features
    assert objective_traits("inpainting", Inpainting(adversarial_weight=0.1)).adversary


def test_feature_gan_is_a_joint_adversary():
    from adapt.domain import FeatureGAN

    traits = objective_traits("adapt", FeatureGAN())
    assert traits.joint and traits.adversary and set(traits.domains) == {"synthetic", "real"}


@pytest.mark.parametrize(("change", "message"), [
    (lambda o: setattr(o, "domains", ()), "non-empty tuple"),
    (lambda o: setattr(o, "domains", "real"), "non-empty tuple"),
    (lambda o: setattr(o, "domains", ("rendered",)), "unknown domains"),
    (lambda o: setattr(o, "joint", "yes"), "`joint` must be a bool"),
    (lambda o: setattr(o, "discriminator_loss", lambda b, m: {}), "not discriminator_parameters"),
    (lambda o: setattr(o, "target", "depth"), "not predict"),
])
def test_broken_objective_is_named(change, message):
    objective = _Loss()
    change(objective)
    with pytest.raises(ObjectiveContractError, match=message) as info:
        objective_traits("mine", objective)
    assert "'mine'" in str(info.value)


def test_not_a_module():
    with pytest.raises(ObjectiveContractError, match=r"nn\.Module"):
        objective_traits("f", lambda batch, backbone: {})


def test_engine_checks_the_contract_when_built(tmp_path):
    from synth.backbone import Backbone
    from synth.engine import Engine, TrainerSettings

    broken = _Loss()
    broken.domains = ("rendered",)
    with pytest.raises(ObjectiveContractError, match="unknown domains"):
        Engine(backbone=Backbone("resnet18"), objectives={"mine": broken}, weights={"mine": 1.0},
               datasets={"real": [0]}, settings=TrainerSettings(device="cpu"), out_dir=tmp_path)
