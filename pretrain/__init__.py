"""Pretraining: MAE ViT distilled from a frozen CLIP teacher, scene + person branches with attention fusion."""
