"""``CLASSIFY_DEFAULTS``: the schema (and defaults) of a ``medseg-dpl classify`` config.

Use with :func:`medseg_dpl.config.load_config`; a key that is not here is an error.
"""
from __future__ import annotations

CLASSIFY_DEFAULTS: dict = {
    "seed": 0,                      # model init, augmentation, and which images are labeled
    "data": {
        "dataset": "digits",        # "digits" (scikit-learn load_digits, 8x8) or "folder"
        "labels_per_class": 2,      # labeled images per class when no labeled_index is given
        "test_fraction": 0.3,       # held-out part (stratified) when there is no test_root
        "test_seed": 0,             # the held-out part is fixed across seeds: comparable top-1
        "root": None,               # folder: ImageFolder-style train folder (root/<class>/<img>)
        "test_root": None,          # folder: optional separate test folder, same class names
        "labeled_index": None,      # folder: file of labeled images (indices or relative paths)
        "image_size": 32,           # folder: images are resized (shorter side) and center-cropped
        "channels": 3,              # folder: 3 (RGB) or 1 (grayscale)
        "num_workers": 0,           # folder: DataLoader workers for reading images
    },
    "model": {
        "width": 32,                # channels of the first stage; doubled at each downsampling
        "dropout": 0.0,
    },
    "method": {
        "name": "debiaspl",         # "supervised", "fixmatch" (EMA teacher) or "debiaspl"
        "threshold": 0.7,           # confidence threshold of the pseudo-labels
        "lambda_u": 1.0,            # weight of the unlabeled loss
        "mu": 7,                    # unlabeled batch = mu x labeled batch
        "ema_momentum": 0.999,      # EMA teacher (EMAN): θ_t <- m·θ_t + (1-m)·θ_s; keep 1/(1-m)
                                    # well below train.steps (digits configs: 0.95)
        "tau": 0.4,                 # debiasing strength τ (DebiasPL)
        "qhat_momentum": 0.999,     # q̂ <- m·q̂ + (1-m)·mean softmax(teacher logits)
        "prior": "uniform",         # reference prior π: "uniform" or "labeled" (class frequencies)
        "teacher_logits": None,     # .npy (num_unlabeled, C): pseudo-labels from external logits
    },
    "optim": {
        "lr": 0.03,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 5e-4,
        "schedule": "cosine",       # "cosine" (FixMatch's 7/16·π cosine) or "constant"
    },
    "train": {
        "steps": 500,
        "batch_size": 32,           # labeled images per step
        "eval_every": 100,
        "log_every": 10,
        "device": "auto",           # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
        "amp": False,               # bfloat16 autocast
        "num_threads": 0,           # CPU intra-op threads; 0 = torch's default. 1 is much faster
                                    # for these tiny models on a busy machine
    },
}

METHODS = ("supervised", "fixmatch", "debiaspl")
