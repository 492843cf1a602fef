"""Semi-supervised classification on the shared core: data, augmentations, methods, training, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medseg_dpl.classification.augment import (cutout, strong_digits, strong_natural, weak_digits,
                                               weak_natural)
from medseg_dpl.classification.datasets import (DatasetError, load_digits_data, load_folder_data,
                                                read_image, read_labeled_index, scan_image_folder)
from medseg_dpl.classification.defaults import CLASSIFY_DEFAULTS
from medseg_dpl.classification.methods import build_method
from medseg_dpl.classification.trainer import class_imbalance, train_classifier
from medseg_dpl.checkpoint import load_checkpoint
from medseg_dpl.cli import main
from medseg_dpl.config import load_config
from medseg_dpl.core.debias import (ResponseEMA, debiased_probs, margin_adjusted_logits,
                                    masked_cross_entropy, pseudo_labels)



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tiny models train faster on one intra-op thread, the more so on shared cores
    (OpenMP threads wait for each other when another process holds a core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FAST = ["train.batch_size=16", "train.unlabeled_batch_size=48", "train.ema_momentum=0.9",
        "train.val_every=1000", "train.log_every=5"]


def test_digits_split_is_stratified_and_fixed():
    a = load_digits_data(2, seed=0)
    b = load_digits_data(2, seed=1)
    assert a.num_classes == 10 and a.in_channels == 1 and a.image_size == 8
    assert len(a.labeled) == 20 and np.bincount(a.labeled.labels.numpy()).tolist() == [2] * 10
    assert len(a.labeled) + len(a.unlabeled) + len(a.test) == 1797
    assert set(a.labeled_index.tolist()).isdisjoint(a.unlabeled_index.tolist())
    assert torch.equal(a.test.images, b.test.images)           # same held-out part for every seed
    assert not np.array_equal(a.labeled_index, b.labeled_index)  # different labeled images
    assert 0.0 <= float(a.test.images.min()) and float(a.test.images.max()) <= 1.0
    with pytest.raises(DatasetError, match="fewer than"):
        load_digits_data(500, seed=0)


def test_augmentations_keep_shape_and_range():
    torch.manual_seed(0)
    d = load_digits_data(2, seed=0).test.images[:64]
    w = weak_digits(d)
    assert w.shape == d.shape
    # integer shifts of at most one pixel: every weak view equals the image moved by (dy, dx)
    for img, out in zip(d[:8], w[:8]):
        pad = torch.nn.functional.pad(img, (1, 1, 1, 1))
        shifts = [pad[:, 1 + dy:9 + dy, 1 + dx:9 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
        assert any(torch.allclose(out, s, atol=1e-5) for s in shifts)
    s = strong_digits(d)
    assert s.shape == d.shape and s.min() >= 0 and s.max() <= 1 and not torch.allclose(s, d)
    x = torch.rand(6, 3, 16, 16)
    for fn in (weak_natural, strong_natural):
        y = fn(x)
        assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and torch.isfinite(y).all()
    box = cutout(torch.zeros(5, 1, 8, 8), 3, value=1.0)
    assert ((box.sum((1, 2, 3)) >= 4) & (box.sum((1, 2, 3)) <= 9)).all()


@pytest.mark.parametrize("name", ["fixmatch", "debiaspl"])
def test_methods_are_the_core_functions(name):
    torch.manual_seed(0)
    cfg = load_config(None, [f"method.name={name}", "debias.momentum=0.5", "method.threshold=0.3",
                             "debias.reference=labeled_prior"], CLASSIFY_DEFAULTS)
    counts = torch.tensor([1, 2, 3, 4])
    method = build_method(cfg, 4, counts)
    student, teacher = torch.randn(32, 4, requires_grad=True), torch.randn(32, 4) * 2
    step = method(student, teacher)
    ema = ResponseEMA(4, 0.5)
    ema.update(torch.softmax(teacher, 1))  # q̂ is updated before it is used (as the paper does)
    torch.testing.assert_close(method.qhat, ema.qhat)
    prior = counts.float() / 10
    if name == "debiaspl":
        probs = debiased_probs(teacher, ema.qhat, 0.4, prior)
        logits = margin_adjusted_logits(student, ema.qhat, 0.4, prior)
    else:
        probs, logits = torch.softmax(teacher, 1), student
    labels, mask = pseudo_labels(probs, 0.3)
    assert torch.equal(step.pseudo_labels, labels) and torch.equal(step.mask, mask)
    torch.testing.assert_close(step.loss, masked_cross_entropy(logits, labels, mask))
    step.loss.backward()
    assert student.grad is not None
    assert set(method.state_dict()) == {"prior", "response.qhat"}
    assert build_method({**cfg, "method": {**cfg["method"], "name": "supervised"}}, 4) is None


def test_cli_trains_debiaspl_on_digits_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["classify", "--config", str(CONFIGS / "digits_debiaspl.yaml"), "--out", str(out),
               "--no-progress", "train.steps=150", *FAST])
    captured = capsys.readouterr()
    printed = captured.out
    assert rc == 0, printed + captured.err
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "top-1" in printed and f"{100 * res['top1']:.1f} %" in printed
    assert res["top1"] > 0.6, res  # chance is 0.1
    assert res["pl_train"]["mask_ratio"] > 0.1 and res["pl_train"]["accuracy"] > 0.6
    assert abs(sum(res["qhat"]) - 1) < 1e-4 and len(res["pl_final"]["counts"]) == 10
    ckpt = load_checkpoint(out / "checkpoints" / "last.pt", kind="classification")
    assert ckpt["step"] == 150 and ckpt["config"]["method"]["name"] == "debiaspl"
    assert set(ckpt["method"]) >= {"response.qhat"}
    lines = (out / "unlabeled.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == res["num_unlabeled"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "loss/labeled", "loss/unlabeled", "pseudo/mask_ratio", "pseudo/accuracy",
            "qhat/0", "qhat/9", "test/top1", "test/top1_student"} <= tags
    assert acc.Scalars("test/top1")[-1].value == pytest.approx(res["top1"])


def _biased_teacher(data, bias: float, seed: int = 0) -> np.ndarray:
    """Logits that know the truth but over-predict class 0 (an imbalanced zero-shot teacher)."""
    rng = np.random.default_rng(seed)
    y = data.unlabeled.labels.numpy()
    logits = 3.0 * np.eye(10)[y] + rng.normal(0, 1.0, (len(y), 10))
    logits[:, 0] += bias
    return logits.astype(np.float32)


def test_teacher_mode_pseudo_labels_come_from_the_file_and_are_debiased(tmp_path):
    data = load_digits_data(2, seed=0)
    path = tmp_path / "teacher.npy"
    np.save(path, _biased_teacher(data, bias=2.0))
    res = {}
    for name in ("fixmatch", "debiaspl"):
        cfg = load_config(str(CONFIGS / "digits_debiaspl.yaml"),
                          [f"method.name={name}", f"teacher.logits={path}",
                           "method.threshold=0.0", "debias.tau=1.0", "debias.momentum=0.8",
                           "train.steps=25", *FAST], CLASSIFY_DEFAULTS)
        res[name] = train_classifier(cfg, None, progress=False, data=data)
        assert res[name]["teacher_mode"]
    fix, deb = res["fixmatch"], res["debiaspl"]
    # the stored logits decide the pseudo-labels: FixMatch's census is exactly the file's argmax
    teacher = np.load(path)
    expected = np.bincount(teacher.argmax(1), minlength=10)
    assert fix["pl_final"]["counts"] == expected.tolist()
    truth_acc = (teacher.argmax(1) == data.unlabeled.labels.numpy()).mean()
    assert fix["pl_final"]["accuracy"] == pytest.approx(truth_acc)
    # class 0 is over-predicted by the teacher; debiasing removes most of that excess
    assert fix["pl_train"]["share"][0] > 0.25
    assert deb["pl_train"]["share"][0] < fix["pl_train"]["share"][0] - 0.1
    assert deb["pl_final"]["imbalance"] < fix["pl_final"]["imbalance"]
    assert deb["pl_final"]["accuracy"] > fix["pl_final"]["accuracy"]
    assert deb["qhat"][0] > 0.2  # q̂ learned the teacher's bias


def test_teacher_logits_file_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "wrong_rows.npy"
    np.save(bad, np.zeros((7, 10), dtype=np.float32))
    rc = main(["classify", "--config", str(CONFIGS / "digits_debiaspl.yaml"), "--out", str(tmp_path / "r"),
               "--no-progress", f"teacher.logits={bad}", "train.steps=2"])
    err = capsys.readouterr().err
    assert rc != 0 and "wrong_rows.npy" in err and "(7, 10)" in err and "Traceback" not in err
    rc = main(["classify", "--config", str(CONFIGS / "digits_debiaspl.yaml"), "--no-progress",
               f"teacher.logits={tmp_path / 'missing.npy'}"])
    assert rc != 0 and "missing.npy" in capsys.readouterr().err


def _write_folder(root, classes=("cat", "ant", "bee"), per_class=6, size=(12, 10)):
    colours = {"ant": (255, 0, 0), "bee": (0, 255, 0), "cat": (0, 0, 255)}
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            arr[...] = colours[c]
            arr[0, 0] = i  # distinct files
            Image.fromarray(arr).save(root / c / f"{c}_{i:02d}.png")
    if "ant" in classes:
        (root / "ant" / "notes.txt").write_text("not an image")


def test_image_folder_reader_and_labeled_index(tmp_path):
    root = tmp_path / "train"
    _write_folder(root)
    classes, paths, labels = scan_image_folder(root)
    assert classes == ["ant", "bee", "cat"]  # sorted, as torchvision's ImageFolder
    assert len(paths) == 18 and labels == [0] * 6 + [1] * 6 + [2] * 6
    assert [p.name for p in paths[:2]] == ["ant_00.png", "ant_01.png"]
    img = read_image(paths[7], 8)
    assert img.shape == (3, 8, 8) and img.dtype == torch.float32
    assert torch.allclose(img[:, 4, 4], torch.tensor([0.0, 1.0, 0.0]))  # a green bee
    assert read_image(paths[0], 8, channels=1).shape == (1, 8, 8)

    index = tmp_path / "labeled.txt"
    index.write_text("# labeled images\n0\nbee/bee_03.png\ncat_05.png\n\n1  # trailing comment\n")
    assert read_labeled_index(index, root, paths).tolist() == [0, 1, 9, 17]
    csv = tmp_path / "labeled.csv"
    csv.write_text("Index\n2\n10\n")
    assert read_labeled_index(csv, root, paths).tolist() == [2, 10]

    data = load_folder_data(root, 8, seed=0, labeled_index=index, test_fraction=0.5)
    assert data.labeled_index.tolist() == [0, 1, 9, 17]
    assert data.labeled.labels.tolist() == [0, 0, 1, 2]
    assert len(data.test) == 6 and sorted(data.test.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert len(data.unlabeled) == 18 - 4 - 6
    assert set(data.unlabeled_index.tolist()).isdisjoint(data.labeled_index.tolist())
    x, y, i = data.unlabeled.batch(torch.tensor([0, 3]))
    assert x.shape == (2, 3, 8, 8) and y.tolist() == data.unlabeled.labels[[0, 3]].tolist()

    test_root = tmp_path / "val"
    _write_folder(test_root, classes=("bee", "cat"), per_class=2)
    data = load_folder_data(root, 8, seed=1, labels_per_class=1, test_root=test_root)
    assert len(data.test) == 4 and data.test.labels.tolist() == [1, 1, 2, 2]  # mapped to train ids
    assert len(data.labeled) == 3 and len(data.unlabeled) == 15

    for text, msg in (("99\n", r"labeled.txt:1: index 99"), ("0\nnope.png\n", r"labeled.txt:2: 'nope.png'")):
        index.write_text(text)
        with pytest.raises(DatasetError, match=msg):
            read_labeled_index(index, root, paths)
    with pytest.raises(DatasetError, match="does not exist"):
        scan_image_folder(tmp_path / "nowhere")
    bad = tmp_path / "bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "broken.png").write_text("not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        read_image(bad / "x" / "broken.png", 8)


def test_cli_trains_on_an_image_folder(tmp_path, capsys):
    root = tmp_path / "train"
    _write_folder(root, per_class=8)
    index = tmp_path / "labeled.txt"
    index.write_text("ant/ant_00.png\nbee/bee_00.png\ncat/cat_00.png\n")
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(f"data: {{dataset: folder, root: '{root}', labeled_index: '{index}', "
                   "image_size: 16}\nmethod: {name: debiaspl}\n"
                   "train: {steps: 6, batch_size: 4, ema_momentum: 0.9, val_every: 3}\n")
    rc = main(["classify", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress",
               "train.unlabeled_batch_size=8"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    res = json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8"))
    assert res["num_labeled"] == 3 and res["num_test"] + res["num_unlabeled"] == 21
    assert "ant/ant_01.png" in (tmp_path / "run" / "unlabeled.txt").read_text(encoding="utf-8")


@pytest.mark.parametrize("override,named", [
    ("method.tauu=1", "method.tauu"), ("debias.tau=high", "debias.tau"),
    ("train.amp=fp32", "train.amp"), ("debias.reference=labeled", "debias.reference"),
    ("train.unlabeled_batch_size=0", "train.unlabeled_batch_size"),
    ("train.steps=1.5", "train.steps"), ("method.name=mixmatch", "method.name"),
    ("train.steps=0", "train.steps"), ("data.dataset=cifar", "data.dataset"),
    ("data=3", "data"), ("optim.schedule=step", "optim.schedule"),
])
def test_cli_config_errors_name_the_key(override, named, tmp_path, capsys):
    rc = main(["classify", "--config", str(CONFIGS / "digits_fixmatch.yaml"), "--out",
               str(tmp_path / "r"), "--no-progress", override])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: ") and named in err and "Traceback" not in err


def test_cli_config_file_errors_name_the_file(tmp_path, capsys):
    assert main(["classify", "--config", str(tmp_path / "absent.yaml")]) != 0
    assert "absent.yaml" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: fixmatch\n  tau_typo: 0.4\n")
    assert main(["classify", "--config", str(bad)]) != 0
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "method.tau_typo" in err
    assert main(["classify", "--config", str(CONFIGS / "digits_fixmatch.yaml"), "--no-progress",
                 "data.dataset=folder"]) != 0
    assert "data.root" in capsys.readouterr().err


def test_class_imbalance():
    assert class_imbalance(np.array([10, 5, 20])) == 4.0
    assert class_imbalance(np.array([3, 0])) == float("inf")
