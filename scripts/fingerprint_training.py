"""Fingerprint short deterministic CPU trainings of every method: sha256 of every checkpoint
tensor and the metrics, to compare code versions bit for bit."""
import hashlib, json, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
repo = Path(sys.argv[1]); sys.path.insert(0, str(repo / "tests"))
from train_helpers import make_tiny_prep, tiny_cfg
from medseg_dpl.engine.trainer import train

def digest(x):
    if isinstance(x, torch.Tensor):
        return hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    if isinstance(x, dict):
        return {k: digest(v) for k, v in x.items() if k not in ("config",)}
    if isinstance(x, (list, tuple)):
        return [digest(v) for v in x]
    return x

out = {}
with tempfile.TemporaryDirectory() as tmp:
    prep = make_tiny_prep(Path(tmp) / "prep", n_cases=6)
    for m in sys.argv[3:]:
        run = Path(tmp) / m
        cfg = tiny_cfg(prep, m, "train.steps=6", "train.val_every=3", "train.checkpoint_every=3",
                       "train.deterministic=true", "data.num_workers=0", "eval.postprocess=true")
        res = train(cfg, run)
        ck = torch.load(run / "checkpoints/last.pt", weights_only=True)
        ck.pop("rng", None)
        out[m] = {"metrics": res, "last": digest(ck),
                  "pseudo_labels": json.loads((run / "pseudo_labels.json").read_text(encoding="utf-8")),
                  "files": sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and "tb" not in p.parts)}
Path(sys.argv[2]).write_text(json.dumps(out, indent=1, sort_keys=True, default=str))
print("wrote", sys.argv[2])
