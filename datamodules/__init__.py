"""Shared LightningDataModules, dataset readers, transforms and label-fraction splits.

- `types`: the data contract (sample dict, `collate_samples`);
- `readers/`: one reader per dataset format, `READERS` (name -> reader); coordinate conventions
  are documented in `readers/__init__.py`;
- `validation`: annotation checks and the fail / skip / drop policy;
- `loading`: records -> raw numpy samples -> contract samples (decode, resize);
- `cache`: the on-disk preprocessing cache; `dataset`: `CrowdDataset`, `build_dataset`;
- `transforms`: training crops, weak / strong views, evaluation padding;
- `splits`: label-fraction split files (`crowdseg splits`) and their loader;
- `crowd`, `semi`, `detection`: the DataModules; `distributed`: batch sizes and samplers under DDP;
- `synthetic`: the built-in synthetic crowd.
"""
