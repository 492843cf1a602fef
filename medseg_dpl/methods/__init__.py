"""Training methods, one short module each, looked up by ``method.name``."""
from __future__ import annotations

from medseg_dpl.methods.base import Algorithm
from medseg_dpl.methods.cld import CLD
from medseg_dpl.methods.cps_depl import CPSDePL
from medseg_dpl.methods.debiaspl import DebiasPL
from medseg_dpl.methods.dhc import DHC
from medseg_dpl.methods.fixmatch import FixMatch
from medseg_dpl.methods.ga import GA
from medseg_dpl.methods.supervised import Supervised

METHODS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (Supervised, FixMatch, DebiasPL, CPSDePL, DHC, CLD, GA)
}


def get_method(name: str) -> type[Algorithm]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r} ({', '.join(METHODS)})") from None
