"""The GSOFT PEFT tuner: config, layers and model, modelled on PEFT's own tuners."""

from .config import GSOFTConfig
from .layer import Conv2d, GSOFTLayer, GSOrthogonal, Linear
from .model import TARGET_MODULES_MAPPING, GSOFTModel
from .peft_type import GSOFTPeftType, register_with_peft

register_with_peft(GSOFTConfig, GSOFTModel)

__all__ = [
    "Conv2d",
    "GSOFTConfig",
    "GSOFTLayer",
    "GSOFTModel",
    "GSOFTPeftType",
    "GSOrthogonal",
    "Linear",
    "TARGET_MODULES_MAPPING",
]
