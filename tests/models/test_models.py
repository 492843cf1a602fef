"""models: ``network_spec`` / ``build_model`` for the networks the shipped configs train.

Output shapes at each config's own patch are checked on the meta device (shapes without the
arithmetic, so VNet at 64 x 128 x 128 costs nothing); real forwards run at <= 32³.
"""
import json
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from medseg_dpl.config import load_config
from medseg_dpl.engine.defaults import SEG_DEFAULTS
from medseg_dpl.models import MODEL_DEFAULTS, build_model, network_spec

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
C = 4


def _seg_configs() -> list[str]:
    """The segmentation configs (``medseg-dpl train``'s schema); the digits configs are the
    classification demo's and have no network section."""
    names = []
    for p in sorted(CONFIGS.glob("*.yaml")):
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        if "model" in raw or "patch_size" in (raw.get("data") or {}):
            names.append(p.name)
    return names


SEG_CONFIGS = _seg_configs()


def _cfg(name: str) -> dict:
    return load_config(CONFIGS / name, [], SEG_DEFAULTS)


def _downsampling(model_cfg: dict) -> int:
    """The factor every input side must be a multiple of."""
    m = {**MODEL_DEFAULTS, **model_cfg}
    if m["name"] == "VNet":
        return 16  # four stride-2 down-transitions
    f = 1
    for s in m["strides"]:
        f *= s
    return f


def _n_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_the_shipped_segmentation_configs_are_found():
    assert {"phantom.yaml", "chaos_mr.yaml", "synapse_20p.yaml", "amos_5p.yaml"} <= set(SEG_CONFIGS)
    assert not any(n.startswith("digits") for n in SEG_CONFIGS)


@pytest.mark.parametrize("name", SEG_CONFIGS)
def test_config_network_output_shape_at_its_patch(name):
    cfg = _cfg(name)
    patch = list(cfg["data"]["patch_size"])
    assert all(s % _downsampling(cfg["model"]) == 0 for s in patch), (name, patch)
    with torch.device("meta"):
        net = build_model(cfg["model"], 1, C).eval()
        out = net(torch.empty(2, 1, *patch))
    assert tuple(out.shape) == (2, C, *patch)


@pytest.mark.parametrize("name", SEG_CONFIGS)
def test_config_network_real_forward_params_and_seed(name):
    cfg = _cfg(name)
    small = [min(s, 32) for s in cfg["data"]["patch_size"]]  # still multiples of the downsampling
    torch.manual_seed(0)
    net = build_model(cfg["model"], 1, C)
    n = _n_params(net)
    assert n > 0
    with torch.no_grad():
        out = net.eval()(torch.rand(2, 1, *small))
    assert tuple(out.shape) == (2, C, *small) and torch.isfinite(out).all()
    # deterministic under a seed: the same architecture and the same initial weights
    torch.manual_seed(0)
    again = build_model(cfg["model"], 1, C)
    sd, sd2 = net.state_dict(), again.state_dict()
    assert _n_params(again) == n and sd.keys() == sd2.keys()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    torch.manual_seed(1)
    other = build_model(cfg["model"], 1, C).state_dict()
    assert any(not torch.equal(sd[k], other[k]) for k in sd if sd[k].is_floating_point())


def test_parameter_counts_follow_the_config():
    small = {"name": "UNet", "channels": [8, 16, 32], "strides": [2, 2]}
    n = _n_params(build_model(small, 1, C))
    assert _n_params(build_model({**small, "channels": [16, 32, 64]}, 1, C)) > n
    assert _n_params(build_model({**small, "num_res_units": 0}, 1, C)) < n   # no residual units
    assert _n_params(build_model(small, 1, C + 10)) > n                      # wider output head
    assert _n_params(build_model(small, 2, C)) > n                           # wider input
    # the phantom config's own network: the published [16, 32, 64, 128] UNet
    assert _n_params(build_model(_cfg("phantom.yaml")["model"], 1, C)) == _n_params(
        build_model({"name": "UNet", "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                     "num_res_units": 1, "norm": "instance"}, 1, C))


@pytest.mark.parametrize("name", ["UNet", "DynUNet"])
def test_small_networks_forward_and_options(name):
    mc = {"name": name, "channels": [8, 16, 32], "strides": [2, 2]}
    torch.manual_seed(0)
    net = build_model(mc, 1, C)
    with torch.no_grad():
        assert tuple(net.eval()(torch.rand(1, 1, 16, 24, 32)).shape) == (1, C, 16, 24, 32)
    assert any(isinstance(m, nn.InstanceNorm3d) for m in net.modules())       # default norm
    bn = build_model({**mc, "norm": "batch"}, 1, C)
    assert any(isinstance(m, nn.BatchNorm3d) for m in bn.modules())
    assert not any(isinstance(m, nn.InstanceNorm3d) for m in bn.modules())
    drop = build_model({**mc, "dropout": 0.2}, 1, C)
    ps = [m.p for m in drop.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    assert ps and all(p == pytest.approx(0.2) for p in ps)
    assert not any(m.p > 0 for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd))


def test_network_spec_is_plain_json_and_instantiable_by_a_monai_bundle():
    for mc in ({"name": "UNet", "channels": (8, 16, 32), "strides": (2, 2)},   # tuples in
               {"name": "DynUNet", "channels": [8, 16, 32], "strides": [2, 2]},
               {"name": "VNet"}):
        target, kwargs = network_spec(mc, 1, C)
        assert target.startswith("monai.networks.nets.") and target.endswith(mc["name"])
        assert json.loads(json.dumps(kwargs)) == kwargs                          # lists, no tuples
        assert kwargs["spatial_dims"] == 3 and kwargs["in_channels"] == 1 and kwargs["out_channels"] == C
    from monai.bundle import ConfigParser
    mc = {"name": "DynUNet", "channels": [8, 16, 32], "strides": [2, 2]}
    target, kwargs = network_spec(mc, 1, C)
    assert kwargs["strides"] == [1, 2, 2] and kwargs["upsample_kernel_size"] == [2, 2]
    bundled = ConfigParser({"network_def": {"_target_": target, **kwargs}}).get_parsed_content("network_def")
    built = build_model(mc, 1, C)
    assert type(bundled) is type(built)
    a, b = bundled.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)


def test_network_spec_defaults_and_no_aliasing():
    target, kwargs = network_spec({}, 1, C)
    assert target == "monai.networks.nets.UNet"
    assert kwargs["channels"] == MODEL_DEFAULTS["channels"] and kwargs["strides"] == MODEL_DEFAULTS["strides"]
    kwargs["channels"].append(256)   # a caller editing the spec must not edit the defaults
    assert MODEL_DEFAULTS["channels"] == [16, 32, 64, 128]
    mc = {"name": "UNet", "channels": [8, 16], "strides": [2]}
    network_spec(mc, 1, C)[1]["channels"].append(32)
    assert mc["channels"] == [8, 16]


def test_unknown_network_and_bad_strides_are_clear_errors():
    with pytest.raises(ValueError, match=r"model\.name: unknown network 'ResNet' \(UNet, DynUNet, VNet\)"):
        build_model({"name": "ResNet"}, 1, C)
    with pytest.raises(ValueError, match=r"unknown network 'ResNet'"):
        build_model(load_config(None, ["model.name=ResNet"], SEG_DEFAULTS)["model"], 1, C)
    for name in ("UNet", "DynUNet"):
        with pytest.raises(ValueError,
                           match=r"model\.strides needs len\(model\.channels\) - 1 = 3 entries, got 2"):
            network_spec({"name": name, "channels": [8, 16, 32, 64], "strides": [2, 2]}, 1, C)
