"""Typed views of the config sections a method reads, parsed once at construction.

``parse(Options, cfg, "section")`` builds the frozen dataclass from ``cfg[section]``; a field
with ``choices`` metadata is checked, and a bad value is a :class:`~medseg_dpl.config.ConfigError`
naming ``section.key``. Methods then read ``self.opts.threshold``, never ``cfg[...]`` per step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")


def choice(*values):
    return field(metadata={"choices": values})


def parse(cls: type[T], cfg: dict, section: str) -> T:
    """``cls`` (a frozen dataclass) from ``cfg[section]``; checks each field's choices."""
    from medseg_dpl.config import ConfigError

    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in cfg[section]:
            raise ConfigError(f"{section}.{f.name}: missing from the config")
        v = cfg[section][f.name]
        allowed = f.metadata.get("choices")
        if allowed and v not in allowed:
            raise ConfigError(f"{section}.{f.name}: expected one of {', '.join(map(str, allowed))}, got {v!r}")
        values[f.name] = v
    return cls(**values)


@dataclass(frozen=True)
class LossOptions:
    """``loss.*``: the supervised loss every method shares."""
    name: str = choice("dice_ce", "organ_dice_ce", "batch_dice_ce", "ga")
    class_weight: str = choice("none", "cld", "distdw")
    logit_adjust: float


@dataclass(frozen=True)
class PseudoLabelOptions:
    """``method.*`` of the pseudo-labeling methods (FixMatch, DebiasPL)."""
    threshold: float
    lambda_u: float
    rampup: float
    unsup_loss: str = choice("ce", "dice_ce", "balanced_ce")
    cutmix: float
    class_thresholds: bool
    threshold_floor: float
    background_threshold: str = choice("fixed", "adaptive")
    threshold_momentum: float
    soft_weight: float


@dataclass(frozen=True)
class DHCOptions:
    """``dhc.*`` (xmed-lab/DHC): DistDW / DiffDW and the CPS weight."""
    dist_momentum: float
    background_min: float
    diff_window: int
    diff_power: float
    skip_absent: bool
    threshold: float
    lambda_u: float
    rampup: float
    sup_loss: str = choice("shared", "published")


@dataclass(frozen=True)
class CLDOptions:
    """``cld.*`` (CLD as in xmed-lab/DHC): class weights, confidence bank, keep rates."""
    power: float
    conf_momentum: float
    conf_every: int
    gamma: float
    lambda_u: float
    rampup: float
    code_bank: bool
    mask_by: str = choice("prediction", "pseudo_label")
    sup_loss: str = choice("shared", "published")


@dataclass(frozen=True)
class GAOptions:
    """``ga.*`` (GA loss in CPS, cicailalala/GALoss)."""
    k: float
    gamma: float
    cps_k: float
    cps_dice: bool
    threshold: float
    lambda_u: float
    rampup: float
    ties: str = choice("index", "topk")
    sup_loss: str = choice("ga", "shared")
