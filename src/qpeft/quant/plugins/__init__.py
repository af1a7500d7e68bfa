"""Quantized layers for optional libraries, registered on first use."""
