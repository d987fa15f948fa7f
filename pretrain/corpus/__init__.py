"""Synthetic speech corpus: TTS engines, phone inventory, sentence grammar, corpus writer."""
