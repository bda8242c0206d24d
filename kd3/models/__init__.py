"""Models: registry, checkpoints and the uniform feature interface."""

from kd3.models.base import FeatureOutput, Kd3Model
from kd3.models.checkpoints import (check_checkpoint_code, import_state_dict, load_model, read_checkpoint,
                                    read_state_dict, save_checkpoint)
from kd3.models.spec import InputSpec, ModelMeta
from kd3.models.registry import MODELS, arch_options, build_model
from kd3.models.user_code import allow_user_code

__all__ = ["FeatureOutput", "Kd3Model", "InputSpec", "ModelMeta", "MODELS", "allow_user_code", "arch_options",
           "build_model", "check_checkpoint_code", "import_state_dict", "load_model", "read_checkpoint", "read_state_dict",
           "save_checkpoint"]
from kd3.models.distilled import DistilledStudent, load_student  # noqa: E402  (registers kd3_student)
