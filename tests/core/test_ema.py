"""ModelEMA (the EMAN teacher): parameters and BatchNorm buffers follow θ_t <- mθ_t + (1-m)θ_s."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg_dpl.core.ema import ModelEMA, unwrap


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def test_initial_copy_is_independent_frozen_eval():
    torch.manual_seed(0)
    student = _net()
    ema = ModelEMA(student, momentum=0.9)
    for (n, t), (_, s) in zip(ema.module.state_dict().items(), student.state_dict().items()):
        assert torch.equal(t, s), n
        assert t.data_ptr() != s.data_ptr()
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())


def test_update_matches_formula_for_params_and_buffers():
    torch.manual_seed(1)
    student = _net()
    ema = ModelEMA(student, momentum=0.75)
    ref = {k: v.clone().double() for k, v in ema.module.state_dict().items()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1)
    student.train()
    for _ in range(3):
        loss = student(torch.randn(8, 1, 6, 6)).pow(2).mean()  # also moves BN running stats
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(student)
        for k, s in student.state_dict().items():
            if s.dtype.is_floating_point:
                ref[k] = 0.75 * ref[k] + 0.25 * s.double()
            else:
                ref[k] = s.clone().double()
    for k, t in ema.module.state_dict().items():
        torch.testing.assert_close(t.double(), ref[k], atol=1e-6, rtol=1e-6, msg=k)
    assert ema.module.state_dict()["1.num_batches_tracked"].item() == 3
    assert not torch.equal(ema.module[1].running_mean, torch.zeros(4))


def test_momentum_zero_copies_and_wrappers_unwrap():
    torch.manual_seed(2)
    student = _net()
    ema = ModelEMA(student, momentum=0.0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)

    class Wrapper(nn.Module):  # stands for DistributedDataParallel's ``.module``
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert unwrap(Wrapper(student)) is student
    ema.update(Wrapper(student))
    for (k, t), s in zip(ema.module.state_dict().items(), student.state_dict().values()):
        torch.testing.assert_close(t, s, msg=k)
    x = torch.randn(2, 1, 6, 6)
    student.eval()
    torch.testing.assert_close(ema(x), student(x))


def test_bad_momentum():
    for m in (1.0, -0.1):
        with pytest.raises(ValueError, match="momentum"):
            ModelEMA(_net(), momentum=m)


def test_teacher_stays_in_eval_mode_when_parent_trains():
    import torch
    from torch import nn

    from medseg_dpl.core.ema import ModelEMA

    student = nn.Sequential(nn.Conv1d(1, 2, 1), nn.BatchNorm1d(2))
    holder = nn.Module()
    holder.teacher = ModelEMA(student, momentum=0.5)
    holder.train()
    assert not holder.teacher.module.training
    before = holder.teacher.module[1].running_mean.clone()
    holder.teacher(torch.randn(4, 1, 3) + 5.0)
    assert torch.equal(holder.teacher.module[1].running_mean, before)


def test_warmup_momentum_starts_as_a_copy_of_the_student():
    student = _net()
    ema = ModelEMA(student, momentum=0.99)
    assert ema.momentum_at(None) == 0.99
    assert ema.momentum_at(0) == 0.0 and ema.momentum_at(1) == 0.5 and ema.momentum_at(9) == pytest.approx(0.9)
    assert ema.momentum_at(10_000) == 0.99
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update(student, step=0)  # m_0 = 0: the teacher is the student
    for a, b in zip(ema.module.parameters(), student.parameters()):
        torch.testing.assert_close(a, b)
