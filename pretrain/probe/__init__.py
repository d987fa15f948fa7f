"""Frozen-feature probes of a model's layers: ABX, phone, speaker, PNMI (``pretrain probe``)."""
