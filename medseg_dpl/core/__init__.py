"""The shared DebiasPL core, used by both the segmentation and the classification trainers."""
from medseg_dpl.core.debias import (ResponseEMA, debiased_probs, log_bias, margin_adjusted_logits,
                                    masked_cross_entropy, pseudo_labels)
from medseg_dpl.core.ema import ModelEMA, unwrap

__all__ = ["ResponseEMA", "debiased_probs", "log_bias", "margin_adjusted_logits",
           "masked_cross_entropy", "pseudo_labels", "ModelEMA", "unwrap"]
