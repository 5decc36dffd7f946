"""Exporters (lightx2v checkpoint, dequantized diffusers folder) and the export verifier; importing this
package registers the exporters and their config schemas."""

from . import dequantized, lightx2v  # noqa: F401  (register exporters)
