"""Shards and what is read from them: the tar reader and writer (``shards``), audio decoding
(``audio``, ``flac``), label sidecars (``labels``), corpus sources and alignments, the training
data pipeline (``pipeline``: plan, crops, batches, mixing, exact resume). Imports nothing, so
that reading a shard loads only what it needs."""
