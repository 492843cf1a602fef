"""Networks from MONAI, chosen and sized by the ``model`` section of the config.

All map ``(N, in_channels, D, H, W)`` to logits ``(N, out_channels, D, H, W)``.
"""
from __future__ import annotations

from torch import nn

MODEL_DEFAULTS = {
    "name": "UNet",                 # UNet | DynUNet | VNet
    "channels": [16, 32, 64, 128],  # feature maps per level (UNet, DynUNet)
    "strides": [2, 2, 2],           # down-sampling between levels (UNet, DynUNet)
    "num_res_units": 1,             # UNet
    "norm": "instance",             # UNet, DynUNet
    "dropout": 0.0,
}


def network_spec(model_cfg: dict, in_channels: int, out_channels: int) -> tuple[str, dict]:
    """``(MONAI class path, constructor kwargs)`` of the configured network (plain JSON types,
    so a MONAI bundle's ``network_def`` can name the same network)."""
    cfg = {**MODEL_DEFAULTS, **model_cfg}
    name = cfg["name"]
    channels, strides = list(cfg["channels"]), list(cfg["strides"])
    if name in ("UNet", "DynUNet") and len(strides) != len(channels) - 1:
        raise ValueError(f"model.strides needs len(model.channels) - 1 = {len(channels) - 1} "
                         f"entries, got {len(strides)}")
    io = {"spatial_dims": 3, "in_channels": in_channels, "out_channels": out_channels}
    if name == "UNet":
        return "monai.networks.nets.UNet", {
            **io, "channels": channels, "strides": strides, "num_res_units": cfg["num_res_units"],
            "norm": cfg["norm"], "dropout": cfg["dropout"]}
    if name == "DynUNet":
        return "monai.networks.nets.DynUNet", {
            **io, "kernel_size": [3] * len(channels), "strides": [1] + strides,
            "upsample_kernel_size": strides, "filters": channels, "norm_name": cfg["norm"],
            "dropout": cfg["dropout"] or None, "res_block": True}
    if name == "VNet":  # fixed widths; input sides must be multiples of 16
        return "monai.networks.nets.VNet", {
            **io, "dropout_prob_down": cfg["dropout"], "dropout_prob_up": [cfg["dropout"], cfg["dropout"]]}
    raise ValueError(f"model.name: unknown network {name!r} (UNet, DynUNet, VNet)")


def build_model(model_cfg: dict, in_channels: int, out_channels: int) -> nn.Module:
    """Build the configured MONAI network (:func:`network_spec`)."""
    import importlib

    target, kwargs = network_spec(model_cfg, in_channels, out_channels)
    module, cls = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)(**kwargs)
