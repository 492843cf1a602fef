"""Config keys that a chosen setting makes inert: set away from their default, an error."""
from __future__ import annotations

# Keys a setting makes inert: (key, the setting that ignores it, when it does, why)
IGNORED_BY = (
    ("debias.response", "debias.variant=organ_prior", lambda c: c["debias"]["variant"] == "organ_prior",
     "organ_prior always counts the raw argmax"),
    ("debias.reference", "debias.variant=organ_prior", lambda c: c["debias"]["variant"] == "organ_prior",
     "organ_prior always compares with π over organs"),
    ("debias.include_background", "debias.variant=organ_prior",
     lambda c: c["debias"]["variant"] == "organ_prior", "organ_prior's background bias is always 0"),
    ("debias.b_max", "debias.variant=paper with debias.response=soft",
     lambda c: c["debias"]["variant"] == "paper" and c["debias"]["response"] == "soft",
     "the soft paper bias is not clipped"),
    ("method.threshold_floor", "method.class_thresholds=false", lambda c: not c["method"]["class_thresholds"],
     "it floors the per-class thresholds only"),
    ("method.background_threshold", "method.class_thresholds=false",
     lambda c: not c["method"]["class_thresholds"], "it applies to the per-class thresholds only"),
)


def check_ignored_keys(cfg: dict, sections: tuple[str, ...]) -> None:
    """A key set away from its default where the chosen setting ignores it is an error naming
    the key (silence would let a config believe it ran something it did not)."""
    from medseg_dpl.config import ConfigError
    from medseg_dpl.engine.defaults import SEG_DEFAULTS

    for key, setting, ignored, why in IGNORED_BY:
        section, name = key.split(".")
        if section not in sections:   # only the running method's own sections
            continue
        value = cfg[section][name]
        if ignored(cfg) and value != SEG_DEFAULTS[section][name]:
            raise ConfigError(f"{key}={value!r} has no effect with {setting} ({why}); remove it "
                              f"or change the setting")
