"""`qpeft recover`: quantize a pretrained model and win its accuracy back by distillation into
LoRA."""
