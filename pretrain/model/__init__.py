"""The HuBERT model: backbone (``encoder``), span masking, the pretraining objective, export."""

from pretrain.model.hubert import HubertBackbone, HubertPretrain, LabelSpec

__all__ = ["HubertBackbone", "HubertPretrain", "LabelSpec"]
