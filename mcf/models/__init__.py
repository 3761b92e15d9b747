"""MCF models: ``create_model(name, teacher_checkpoint=..., objective=Objective(...))`` and ``list_models()``."""

from mcf.models.arch import MCFSpec, ViTArch
from mcf.models.mcf import MCF, MCFOnline, MCFOutput, TargetEncoder
from mcf.models.objective import Objective
from mcf.models.registry import create_model, create_model_from_config, create_teacher, get_spec, list_models

__all__ = ["MCF", "MCFOnline", "MCFOutput", "MCFSpec", "Objective", "TargetEncoder", "ViTArch", "create_model",
           "create_model_from_config", "create_teacher", "get_spec", "list_models"]
