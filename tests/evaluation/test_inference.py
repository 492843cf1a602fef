"""Sliding-window inference: shapes, and agreement with one forward pass of the whole volume."""
from __future__ import annotations

import torch

from medseg_dpl.evaluation.inference import sliding_window_predict


def _net(kernel: int, classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, classes, kernel, padding=kernel // 2).eval()


def _direct(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(net(x), dim=1)


def test_output_is_n_c_spatial_for_a_volume_not_a_multiple_of_the_roi():
    x = torch.rand(2, 1, 19, 13, 11)
    p = sliding_window_predict(_net(3), x, (8, 8, 8), overlap=0.25, sw_batch_size=3)
    assert p.shape == (2, 3, 19, 13, 11) and p.dtype == torch.float32 and not p.requires_grad
    torch.testing.assert_close(p.sum(1), torch.ones(2, 19, 13, 11))
    # the cases of a batch are predicted independently
    torch.testing.assert_close(p[1:], sliding_window_predict(_net(3), x[1:], (8, 8, 8), overlap=0.25))


def test_roi_covering_the_volume_equals_a_direct_forward_pass():
    x = torch.rand(1, 1, 16, 12, 10)
    net = _net(3)
    torch.testing.assert_close(sliding_window_predict(net, x, (16, 12, 10)), _direct(net, x))
    # a ROI larger than the volume: MONAI pads with zeros, as the convolution's own padding
    torch.testing.assert_close(sliding_window_predict(net, x, (24, 24, 24)), _direct(net, x))
    # amp is CUDA only: ignored on CPU
    torch.testing.assert_close(sliding_window_predict(net, x, (16, 12, 10), amp=True), _direct(net, x))


def test_overlapping_windows_blend_to_the_direct_pass_of_a_pointwise_network():
    """A 1x1x1 network sees no window border, so any tiling must give the whole-volume result:
    the Gaussian weights of overlapping windows average equal values."""
    x = torch.rand(1, 1, 19, 13, 11)
    net = _net(1)
    for overlap in (0.0, 0.5):
        torch.testing.assert_close(sliding_window_predict(net, x, (8, 8, 8), overlap=overlap),
                                   _direct(net, x))
