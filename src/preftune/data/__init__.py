"""Preference data: load, normalize, apply chat templates and tokenize."""

from .formats import (
    FORMATS,
    BadRow,
    BadRowsError,
    DataFormatError,
    PreferenceExample,
    RowError,
    detect_format,
    normalize_rows,
)
from .loading import (
    SUPPORTED_EXTENSIONS,
    LoadedData,
    carve_test_split,
    load_preference_splits,
    read_data_file,
)
from .templates import (
    CHATML_TEMPLATE,
    TEMPLATE_FORMATS,
    ZEPHYR_TEMPLATE,
    apply_template,
    render_prompt,
    render_reply,
)
from .tokenize import TokenizedPair, tokenize_examples, tokenize_pair

__all__ = [
    "CHATML_TEMPLATE",
    "FORMATS",
    "SUPPORTED_EXTENSIONS",
    "TEMPLATE_FORMATS",
    "ZEPHYR_TEMPLATE",
    "BadRow",
    "BadRowsError",
    "DataFormatError",
    "LoadedData",
    "PreferenceExample",
    "RowError",
    "TokenizedPair",
    "apply_template",
    "carve_test_split",
    "detect_format",
    "load_preference_splits",
    "normalize_rows",
    "read_data_file",
    "render_prompt",
    "render_reply",
    "tokenize_examples",
    "tokenize_pair",
]
