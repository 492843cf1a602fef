"""Class names and numbering of the supported datasets, defined once.

Index 0 is always background. Short names (used as column names in tables and CSVs) follow
the DHC/MagicNet papers' abbreviations.
"""
from __future__ import annotations

SYNAPSE_CLASSES = (
    "background", "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver",
    "stomach", "aorta", "inferior_vena_cava", "portal_splenic_veins", "pancreas",
    "right_adrenal_gland", "left_adrenal_gland",
)

AMOS_CLASSES = (
    "background", "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver",
    "stomach", "aorta", "postcava", "pancreas", "right_adrenal_gland", "left_adrenal_gland",
    "duodenum", "bladder", "prostate_uterus",
)

SHORT_NAMES = {
    "background": "BG", "spleen": "Sp", "right_kidney": "RK", "left_kidney": "LK",
    "gallbladder": "Ga", "esophagus": "Es", "liver": "Li", "stomach": "St", "aorta": "Ao",
    "inferior_vena_cava": "IVC", "postcava": "PA", "portal_splenic_veins": "PSV",
    "pancreas": "Pa", "right_adrenal_gland": "RAG", "left_adrenal_gland": "LAG",
    "duodenum": "Du", "bladder": "Bl", "prostate_uterus": "P/U",
}

DATASET_CLASSES = {"synapse": SYNAPSE_CLASSES, "amos": AMOS_CLASSES}


def class_names(dataset: str) -> tuple[str, ...]:
    """Class names (background first) of ``"synapse"`` or ``"amos"``."""
    try:
        return DATASET_CLASSES[dataset]
    except KeyError:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASET_CLASSES)}") from None


def short_name(name: str) -> str:
    return SHORT_NAMES.get(name, name)
