"""medseg-dpl: debiased pseudo-labeling for semi-supervised CT organ segmentation."""
__version__ = "0.1.0"
