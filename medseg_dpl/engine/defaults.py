"""The one schema of ``medseg-dpl train``: every key a config file or an override may set.

``load_config(path, overrides, SEG_DEFAULTS)`` validates against it (unknown keys and wrong
types are errors naming the key).
"""
from __future__ import annotations

import copy

from medseg_dpl.models import MODEL_DEFAULTS

SEG_DEFAULTS = {
    "data": {
        "root": "",                   # PREP_DIR (dataset.json, imagesTr/, labelsTr/, splits/)
        "labeled_split": "labeled_20p",
        "unlabeled_split": "unlabeled_20p",
        "eval_split": "eval",
        "patch_size": [64, 128, 128],
        "num_samples": 1,             # crops per volume per step
        "spatial_aug": True,          # random affine (rotation, scaling) of training crops
        "cache": True,
        "num_workers": 0,             # loader worker processes (0: in the main process)
    },
    "model": copy.deepcopy(MODEL_DEFAULTS),
    "loss": {                         # the supervised loss of every method (labeled crops)
        "name": "dice_ce",            # dice_ce (MONAI DiceCELoss: per-crop Dice incl. background + CE)
                                      # | organ_dice_ce (per-crop Dice over organs + CE)
                                      # | batch_dice_ce (batch Dice over organs + CE, nnU-Net's form)
                                      # | ga (GACE top-10 % + GADice, Qi et al.; k, gamma as published)
        "class_weight": "none",       # none | cld | distdw: a peer's class weights from π on the
                                      #   single-network methods' loss (controls for dhc/cld)
        "logit_adjust": 0.0,          # τ_l: CE on z + τ_l·log π (the adaptive margin with the known
                                      #   label distribution, Menon et al.); Dice on the raw softmax
    },
    "method": {
        "name": "debiaspl",           # supervised | fixmatch | debiaspl | cps_depl | dhc | cld | ga
        "threshold": 0.9,             # confidence threshold of the pseudo-labels
        "lambda_u": 1.0,              # weight of the unsupervised loss after ramp-up
        "rampup": 0.0,                # sigmoid ramp-up of lambda_u over this fraction of train.steps
        "unsup_loss": "ce",           # ce (masked CE, FixMatch) | dice_ce (+ Dice on confident voxels)
                                      #   | balanced_ce (CE averaged per pseudo-label class)
        "cutmix": 0.5,                # probability of a CutMix box per strong unlabeled crop
        "class_thresholds": False,    # per-class thresholds from confident rate / π (FlexMatch-style),
                                      #   once per step on the (debiased) teacher probabilities
        "threshold_floor": 0.5,       # lowest per-class threshold
        "background_threshold": "fixed",  # fixed: background keeps method.threshold | adaptive: its own
        "threshold_momentum": 0.99,   # EMA of the confident pseudo-labels' class shares
        "soft_weight": 0.0,           # > 0: + this weight × soft CE towards the (debiased) teacher
                                      #   probabilities on the voxels below the threshold
    },
    "debias": {
        "variant": "organ_prior",     # organ_prior (organ-only, prior-matched) | paper
        "tau": 1.0,                   # strength of the debiasing (0 = FixMatch)
        "momentum": 0.99,             # of the response EMA q̂
        "masked": False,              # q̂ over confident voxels only
        "response": "soft",           # what q̂ averages: soft (softmax, the paper) | hard (argmax one-hot)
        "reference": "labeled_prior", # labeled_prior (log q̂/π) | uniform (the paper: log q̂)
        "include_background": True,   # False: background's bias term is 0 (only organs debiased)
        "b_max": 2.0,                 # organ_prior: bias clipped to ±b_max nats
    },
    "dhc": {                          # method.name=dhc (xmed-lab/DHC, MICCAI 2023)
        "dist_momentum": 0.99,        # DistDW (network B): EMA towards B's pseudo-label counts
        "background_min": 0.0,        # floor on DistDW's background weight (0: as published, log 1 = 0)
        "diff_window": 50,            # DiffDW (network A): K, EMA momentum (K-1)/K
        "diff_power": 0.2,            # DiffDW: exponent of unlearn/learn
        "skip_absent": True,          # DiffDW: a class absent from labels and prediction keeps its
                                      #   state (false: the code, Dice 0.5 by its smoothing)
        "threshold": 0.0,             # confidence threshold on cross pseudo-labels (0: none, as published)
        "lambda_u": 0.1,              # CPS weight, as published (README: -w 0.1; method.lambda_u=1 collapsed)
        "rampup": 1.0,                # its sigmoid ramp-up over this fraction of the run (the code: whole run)
        "sup_loss": "shared",         # shared: DiffDW/DistDW weights on loss.name | published: DHC's
                                      #   weighted CE + weighted batch Dice (smooth 1) over organs
    },
    "cld": {                          # method.name=cld (CLD, MICCAI 2022, as in xmed-lab/DHC)
        "power": 0.3333333333333333,  # class weights (N_max/N_c)^power from the labeled voxels
        "conf_momentum": 0.999,       # confidence bank EMA
        "conf_every": 8,              # steps averaged per confidence-bank update
        "gamma": 0.5,                 # keep rate ((1-conf_c)/max(1-conf))^gamma
        "mask_by": "prediction",      # keep rate of the trained network's own argmax's class (the code)
                                      #   | pseudo_label (the partner's: adopts rare labels ~70x easier)
        "lambda_u": 0.1,              # CPS weight, as published in xmed-lab/DHC's train_cld.py
        "rampup": 1.0,                # its sigmoid ramp-up over this fraction of the run
        "code_bank": False,           # true: the code's bank (random start, absent class = conf 0)
        "sup_loss": "shared",         # shared: CLD's weights on loss.name | published: DHC-repo form
    },
    "ga": {                           # method.name=ga (GA loss in CPS, Qi et al. ECCV 2024, cicailalala/GALoss)
        "k": 10.0,                    # GACE on labeled crops: CE of the k % hardest voxels
        "gamma": 0.5,                 # GACE: class c's sum divided by n_c^(1-gamma)·(kN)^gamma
        "cps_k": 100.0,               # GACE k on the cross pseudo-labels (100: every voxel, as published)
        "cps_dice": False,            # + GADice on the cross pseudo-labels (published: GACE only)
        "threshold": 0.0,             # confidence threshold on cross pseudo-labels (0: none, as published)
        "lambda_u": 0.1,              # CPS weight, as published (train_AMOS_CPS.py: 0.1)
        "rampup": 1.0,                # its sigmoid ramp-up over this fraction of the run (the code: whole run)
        "ties": "index",              # top-k ties: index (first voxels, same on every device)
                                      #   | topk (torch.topk's choice, as published)
        "sup_loss": "ga",             # ga: GACE(k) + GADice on labeled crops (published) | shared: loss.name
    },
    "optim": {
        "name": "sgd",                # sgd | adamw
        "lr": 0.01,
        "momentum": 0.9,
        "nesterov": True,
        "weight_decay": 3e-5,
        "poly_power": 0.9,            # lr = lr0 · (1 - step/steps)^power
        "warmup_steps": 0,
        "grad_clip": 12.0,            # max global grad norm (0: off)
    },
    "train": {
        "steps": 1000,
        "batch_size": 2,              # labeled volumes per step (per rank)
        "unlabeled_batch_size": 2,    # unlabeled volumes per step (per rank)
        "seed": 0,
        "amp": "bf16",                # bf16 | fp16 | none; CUDA only, CPU runs full precision
        "compile": False,             # torch.compile the student(s)
        "ema_momentum": 0.99,         # EMA teacher, with warm-up m_t = min(m, 1 - 1/(t+1))
        "checkpoint_every": 100,
        "val_every": 100,
        "log_every": 10,
        "device": "auto",             # auto | cpu | cuda
        "deterministic": False,       # torch.use_deterministic_algorithms (exact CPU resume)
        "progress": True,
    },
    "eval": {
        "overlap": 0.5,
        "sw_batch_size": 2,
        "max_cases": 0,               # 0: every eval case
        "tta": False,                 # eval/predict: average softmax over the 8 axis flips
        "postprocess": True,          # end of train: decide per-organ connected-component rules
    },
    "teacher": {
        "predictions": "",            # DIR of NIfTI predictions (<id>.nii.gz) of an external model
        "smoothing": 0.1,             # label maps -> (1-s)·one-hot + s/C probabilities
    },
}
