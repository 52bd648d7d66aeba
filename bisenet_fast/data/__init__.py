"""Cityscapes data (spec §8), the spec §5/§7 pipelines, a synthetic Cityscapes-layout set, the sampler."""
