"""Plugins that register LoRA layers of optional libraries when those libraries are imported."""
