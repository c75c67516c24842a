"""Shared LightningDataModules, dataset readers, transforms and label-fraction splits."""
