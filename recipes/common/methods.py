"""``--method gsoft|double_gsoft|lora|oft|boft|full``: one switch for side-by-side runs in every recipe.

Each recipe keeps per-method options in its YAML (``method_options: {gsoft: {block_size: 8}, lora: {r: 8}, ...}``) and
passes the selected method's mapping here, so comparing methods never means editing a config.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from typing import Any, Optional, Sequence, Union

from peft import BOFTConfig, LoraConfig, OFTConfig, PeftConfig, get_peft_model
from torch import nn

from gsoft.tuner import GSOFTConfig

from .args import option_error

logger = logging.getLogger(__name__)

#: The PEFT config class of each adapter method.
_CONFIG_CLASSES: dict[str, type[PeftConfig]] = {
    "gsoft": GSOFTConfig,
    "double_gsoft": GSOFTConfig,
    "lora": LoraConfig,
    "oft": OFTConfig,
    "boft": BOFTConfig,
}
#: The adapter methods, the two GSOFT ones among them, and every method (``full``: all weights trained, no adapter).
PEFT_METHODS: tuple[str, ...] = tuple(_CONFIG_CLASSES)
GSOFT_METHODS: tuple[str, ...] = tuple(m for m, cls in _CONFIG_CLASSES.items() if cls is GSOFTConfig)
METHODS: tuple[str, ...] = (*PEFT_METHODS, "full")


def _check_method(method: str) -> None:
    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"Unknown method {method!r}{hint}; choose one of {', '.join(METHODS)}.")


def check_method_choice(method: str, method_learning_rates: dict[str, Any]) -> None:
    """A recipe's ``--method`` and ``--method_learning_rates`` (a peak learning rate per method name)."""
    if method not in METHODS:
        raise option_error("method", method, f"not one of {', '.join(METHODS)}")
    unknown = sorted(set(method_learning_rates) - set(METHODS))
    if unknown:
        raise option_error("method_learning_rates", method_learning_rates,
                           f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    for name, rate in method_learning_rates.items():
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
            raise option_error("method_learning_rates", method_learning_rates,
                               f"the rate of {name} must be a number > 0, got {rate!r}")


def target_modules_value(targets: Optional[Union[Sequence[str], str]]) -> Optional[Union[list[str], str]]:
    """A recipe's list of layers as PEFT takes it: a single item that looks like a regex becomes a regex string (PEFT
    full-matches a string against every layer name); otherwise the names or name suffixes as a list."""
    if targets is None or isinstance(targets, str):
        return targets
    targets = list(targets)
    return targets[0] if len(targets) == 1 and _is_regex(targets[0]) else targets


def _is_regex(text: str) -> bool:
    return any(c in text for c in "*+?[]()|\\^$")


def _check_layer_names(key: str, value: Any) -> None:
    """``target_modules`` / ``modules_to_save``: null, one regex string, or a list of layer names."""
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) and item for item in value):
        return
    raise ValueError(f"{key} {value}: must be a list of layer names or one regex string, e.g. [query, value] or "
                     "'.*\\.(query|value)'.")


def build_peft_config(
    method: str,
    target_modules: Optional[Union[list[str], str]],
    *,
    modules_to_save: Optional[list[str]] = None,
    task_type: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
) -> Optional[PeftConfig]:
    """The PEFT config for ``method`` (``None`` for full fine-tuning).

    ``options`` are keyword arguments of the method's config class (``GSOFTConfig``, ``LoraConfig``, ``OFTConfig``,
    ``BOFTConfig``); an unknown one is an error rather than silently ignored, since a typo would change the run.
    """
    _check_method(method)
    options = dict(options or {})
    if method == "full":
        if options:
            raise ValueError(f"Method 'full' takes no options, got {sorted(options)}.")
        return None
    config_cls = _CONFIG_CLASSES[method]
    known = {f.name for f in dataclasses.fields(config_cls) if f.init}
    for key in options:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"Unknown option {key!r} for method {method!r} ({config_cls.__name__}){hint}")
    if method == "double_gsoft":
        if options.get("double") is False:
            raise ValueError("Method 'double_gsoft' means double=True; use method 'gsoft' for one-sided GSOFT.")
        options["double"] = True
    elif method == "gsoft" and options.get("double"):
        raise ValueError("Method 'gsoft' with double=True: use method 'double_gsoft' so results are labelled right.")
    kwargs: dict[str, Any] = {"target_modules": target_modules, "modules_to_save": modules_to_save}
    if task_type is not None:
        kwargs["task_type"] = task_type
    for key in ("target_modules", "modules_to_save"):
        if key in options:
            kwargs[key] = options.pop(key)
        _check_layer_names(key, kwargs[key])
    try:
        return config_cls(**kwargs, **options)
    except TypeError as exc:  # a value of the wrong kind that the config class does not check itself
        raise ValueError(f"{config_cls.__name__} options {options}: {exc}") from exc


def check_targets(model: nn.Module, config: PeftConfig, option: str = "--target_modules", what: str = "model") -> None:
    """Fail before PEFT does when the targets match no layer, listing the layer names the model does have (PEFT
    only says that they were not found). No-op when the config leaves the targets to the architecture's default."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if getattr(config, "target_modules", None) is None:
        return
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if any(check_target_module_exists(config, n) for n in names):
        return
    tails = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1] for n in names})
    targets = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
    raise ValueError(
        f"{option} {targets} match no Linear/Conv2d layer of the {what} ({type(model).__name__}). Its layers end "
        f"in: {', '.join(tails[:40])}{' ...' if len(tails) > 40 else ''}."
    )


def get_peft_model_checked(model: nn.Module, config: PeftConfig) -> nn.Module:
    """``peft.get_peft_model``, reporting PEFT's silent fallback of BOFT to one butterfly factor (it happens whenever
    BOFT's CUDA extension cannot build, e.g. on every CPU machine): a run must not quietly be a different method."""
    peft_model = get_peft_model(model, config)
    wanted = getattr(config, "boft_n_butterfly_factor", None)
    used = {p.shape[0] for name, p in peft_model.named_parameters() if "boft_R" in name}
    if wanted and used and max(used) != wanted:
        logger.warning(
            "PEFT's BOFT uses %s butterfly factor(s) instead of boft_n_butterfly_factor=%s: its CUDA extension did not "
            "build (no GPU or no compiler), and PEFT then silently falls back to 1 factor.", sorted(used), wanted,
        )
    return peft_model


def apply_method(
    model: nn.Module,
    method: str,
    target_modules: Optional[Union[list[str], str]],
    *,
    modules_to_save: Optional[list[str]] = None,
    task_type: Optional[str] = None,
    options: Optional[dict[str, Any]] = None,
    target_option: str = "--target_modules",
) -> nn.Module:
    """Wrap ``model`` for ``method``: a ``PeftModel``, or for ``"full"`` the model itself with every weight trainable.
    Targets that match nothing are reported under ``target_option`` (the recipe's option name)."""
    config = build_peft_config(
        method, target_modules, modules_to_save=modules_to_save, task_type=task_type, options=options
    )
    if config is None:
        model.requires_grad_(True)
        return model
    check_targets(model, config, target_option)
    return get_peft_model_checked(model, config)
