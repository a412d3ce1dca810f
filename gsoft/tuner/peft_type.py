"""GSOFT's PEFT type and its registration in PEFT's method tables.

PEFT's ``register_peft_method`` only accepts names of its closed ``PeftType`` enum, so we write our own ``str`` Enum
member into the same tables it fills. A ``str`` Enum keeps ``.value`` working and hashes equal to ``"GSOFT"``, so an
``adapter_config.json`` with ``"peft_type": "GSOFT"`` finds our config class.
"""

from __future__ import annotations

import enum


class GSOFTPeftType(str, enum.Enum):
    GSOFT = "GSOFT"

    def __str__(self) -> str:  # json / logs show "GSOFT", like PEFT's own types
        return self.value


PREFIX = "gsoft_"


def register_with_peft(config_cls: type, model_cls: type) -> None:
    """Make ``get_peft_model``, ``PeftModel.from_pretrained`` & co. know GSOFT. Idempotent; never overwrites others."""
    from peft import mapping

    peft_type = GSOFTPeftType.GSOFT
    tables = {
        "PEFT_TYPE_TO_CONFIG_MAPPING": config_cls,
        "PEFT_TYPE_TO_TUNER_MAPPING": model_cls,
        "PEFT_TYPE_TO_PREFIX_MAPPING": PREFIX,
    }
    for table_name, value in tables.items():
        table = getattr(mapping, table_name)
        existing = table.get(peft_type)
        if existing is None:
            continue
        same = existing == value if isinstance(value, str) else getattr(existing, "__qualname__", None) == getattr(
            value, "__qualname__", None
        ) and getattr(existing, "__module__", None) == getattr(value, "__module__", None)
        if not same:
            raise KeyError(
                f"peft.mapping.{table_name} already has an entry for {peft_type.value!r} ({existing!r}); refusing to "
                "overwrite it. Another package registered a PEFT method of the same name."
            )
    if PREFIX in {v for k, v in mapping.PEFT_TYPE_TO_PREFIX_MAPPING.items() if k != peft_type}:
        raise KeyError(f"The parameter prefix {PREFIX!r} is already used by another PEFT method.")
    for table_name, value in tables.items():
        getattr(mapping, table_name)[peft_type] = value
