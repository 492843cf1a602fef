"""Deployment: ``medseg-dpl export`` turns a training checkpoint into a MONAI bundle.

* :mod:`medseg_dpl.deploy.export`: the bundle writer (metadata, inference config, weights,
  TorchScript, README, licence);
* :mod:`medseg_dpl.deploy.transforms`: the few MONAI-style transforms the bundle's
  ``inference.json`` references where MONAI has no exact equivalent of a step of ``predict``
  (they call the package's own functions, so the bundle holds no copied code);
* :mod:`medseg_dpl.deploy.cli`: the ``export`` verb.
"""
