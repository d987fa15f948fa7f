"""Typed, validated configuration for every stage (see ``core`` for the merge rules)."""

from pretrain.config.core import (
    ConfigError,
    describe,
    field_docs,
    iter_fields,
    load_config,
    quote_override,
    template_yaml,
    to_yaml,
    validate,
    write_run_record,
)

__all__ = [
    "ConfigError",
    "describe",
    "field_docs",
    "iter_fields",
    "load_config",
    "quote_override",
    "template_yaml",
    "to_yaml",
    "validate",
    "write_run_record",
]
