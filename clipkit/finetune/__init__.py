"""Downstream fine-tuning of a pretrained dual encoder: linear probe, full and partial fine-tuning, WiSE-FT, LoRA.

    clipkit finetune --checkpoint CK --data DIR --method full --out RUN_DIR [CONFIG.yaml] [dotted overrides]

Like clipkit/run.py, this layer composes the others (models, data, evaluation, export)."""
