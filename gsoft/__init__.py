"""gsoft: orthogonal fine-tuning with Group-and-Shuffle matrices, as a PEFT method.

``import gsoft`` registers GSOFT with PEFT, so ``peft.get_peft_model(model, gsoft.GSOFTConfig(...))``,
``PeftModel.from_pretrained`` and transformers' ``model.load_adapter`` work for GSOFT adapters.
"""

from . import gs, plan
from .gs import is_dense, materialize, orthogonal_blocks
from .plan import gs_apply
from .tuner import GSOFTConfig, GSOFTModel, GSOFTPeftType

__version__ = "0.1.0"

__all__ = [
    "GSOFTConfig",
    "GSOFTModel",
    "GSOFTPeftType",
    "gs",
    "plan",
    "gs_apply",
    "is_dense",
    "materialize",
    "orthogonal_blocks",
]
