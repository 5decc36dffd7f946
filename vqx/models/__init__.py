"""Models: the model adapter (adapter.py: protocol, registry, family-neutral types), loading and fingerprints,
and one package per model family (wan/), imported here so its adapter is registered."""

from . import wan  # noqa: F401
