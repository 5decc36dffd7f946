"""Exporters (lightx2v checkpoint, dequantized diffusers folder) and the export verifier. `schemas` registers
their settings without importing torch; `vqx.plugins` imports the exporters (`lightx2v`, `dequantized`)."""
