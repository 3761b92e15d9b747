"""The model is built from its config sections: every masking/loss option is one field of
:class:`mcf.models.Objective`, reachable from the config tree (``--set``) and reaching the model's output."""

import dataclasses
import json

import pytest
import torch

from mcf.config import Config, LossConfig, MaskingConfig, build_config
from mcf.errors import ConfigError
from mcf.models import Objective, create_model, create_model_from_config
from mcf.models.registry import ARCH_KEYS

# a valid value other than the default, per Objective field (a new field needs one here)
EXAMPLES = {
    "mask_ratio": 0.5,
    "mask_ratio_range": [0.5, 0.9],
    "perceptual_weight": 10.0,
    "contrastive_weight": 0.5,
    "pixel_weight": 2.0,
    "norm_pix": True,
    "temperature": 0.1,
    "perceptual_layers": [1, 3],
    "perceptual_norm": "feature",
    "perceptual_resize": "bilinear",
}
# a 16 px teacher under the 32 px tiny model: the perceptual resize is not the identity, so its mode matters
TINY = ["model.name=mcf_vit_tiny", "teacher.checkpoint=random", "teacher.img_size=16"]


def _run(overrides: list[str]) -> tuple[Objective, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = create_model_from_config(build_config(None, [*TINY, *overrides]))
    g = torch.Generator().manual_seed(1)
    x, n1, n2 = torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 64, generator=g), torch.rand(4, 64, generator=g)
    torch.manual_seed(2)  # the per-image ratios of mask_ratio_range
    with torch.no_grad():
        out = model(x, n1, n2)
    return model.objective, out.loss, out.losses


@pytest.fixture(scope="module")
def default_run():
    return _run([])


def test_objective_defaults_are_the_config_defaults():
    assert Objective() == Objective.from_config(Config())


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Objective)])
def test_every_objective_field_is_set_from_the_config_and_reaches_the_model(name, default_run):
    assert name in EXAMPLES, f"give the new Objective field {name!r} a non-default example value in EXAMPLES"
    key = Objective.config_keys()[name]
    objective, loss, losses = _run([f"{key}={json.dumps(EXAMPLES[name])}"])
    expected = Objective(**{name: EXAMPLES[name]})
    assert getattr(expected, name) != getattr(Objective(), name)
    assert objective == expected  # this field changed, every other one kept its default
    default_objective, default_loss, default_losses = default_run
    assert default_objective == Objective()
    # the model's output moves with the option (norm_pix only moves the pixel term: its weight is 0 by default)
    changed = not torch.equal(loss, default_loss) or any(not torch.equal(losses[k], default_losses[k]) for k in losses)
    assert changed, f"{key} reaches the model's objective but not its output"


def test_every_loss_and_masking_key_builds_the_model():
    """A key added to ``loss`` or ``masking`` without an Objective field (or an architecture override) fails here."""
    config_keys = {f"{section}.{f.name}" for section, cls in (("loss", LossConfig), ("masking", MaskingConfig))
                   for f in dataclasses.fields(cls)}
    consumed = set(Objective.config_keys().values()) | {k for k in ARCH_KEYS if k.startswith(("loss.", "masking."))}
    assert config_keys == consumed


def test_projector_keys_override_the_architecture():
    torch.manual_seed(0)
    model = create_model_from_config(build_config(None, [*TINY, "loss.projector_hidden=32", "loss.projector_dim=16"]))
    assert (model.spec.proj_hidden, model.spec.proj_dim) == (32, 16)
    assert model.online.predictor[-1].out_features == 16


def test_objective_option_given_as_architecture_override_names_the_objective():
    with pytest.raises(ConfigError, match=r"mask_ratio belong\(s\) to the objective: objective=Objective"):
        create_model("mcf_vit_tiny", teacher_checkpoint="random", mask_ratio=0.5)
