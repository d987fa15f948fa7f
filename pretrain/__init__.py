"""pretrain: distributed self-supervised pretraining of HuBERT-style speech models."""

__version__ = "0.1.0"
