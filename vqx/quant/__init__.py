"""Number formats, the quantizer math and quantized linear modules."""
