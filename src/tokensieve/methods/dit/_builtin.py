"""Imports every built-in DiT method so that its ``@register`` runs (loaded by the DiT registry on first use)."""

from . import adaspa, full, psa, radial, ras, svg, svg2, vmoba  # noqa: F401
