"""MCF models: ``create_model(name, teacher_checkpoint=...)`` and ``list_models()``."""

from mcf.models.mcf import MCF, MCFOnline, MCFOutput, MCFSpec, TargetEncoder
from mcf.models.registry import create_model, create_model_from_config, create_teacher, get_spec, list_models

__all__ = ["MCF", "MCFOnline", "MCFOutput", "MCFSpec", "TargetEncoder", "create_model", "create_model_from_config", "create_teacher", "get_spec", "list_models"]
