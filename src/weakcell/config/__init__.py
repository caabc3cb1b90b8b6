"""One typed config for every stage: YAML files in ``configs/``, a pydantic schema here, ``key=value``
overrides on the command line. Unknown or mistyped keys fail with their name and the closest valid keys.

Three parts, one import path (``from weakcell.config import Config, load_config``):

- ``schema``: the sections and ``Config`` with its derived locations;
- ``loading``: YAML files with ``base:`` chains, overrides, validation, ``save_config``;
- ``lineage``: which settings invalidate which finished output (``OUTPUT_INPUTS``, ``changed_settings``).
"""

from weakcell.config.lineage import OUTPUT_INPUTS, Inputs, Output, changed_settings
from weakcell.config.loading import (
    ConfigError,
    all_keys,
    deep_merge,
    describe_keys,
    load_config,
    parse_overrides,
    save_config,
)
from weakcell.config.schema import (
    AblateConfig,
    CacheConfig,
    CellposeSegmentConfig,
    ChecksConfig,
    ClassicalSegmentConfig,
    Config,
    DataConfig,
    EvaluateConfig,
    ExternalConfig,
    FetchItem,
    FoldsConfig,
    HpaCellSegConfig,
    ImageModelConfig,
    InferConfig,
    KaggleConfig,
    MilConfig,
    ModelConfig,
    PathsConfig,
    PostprocessConfig,
    RefineConfig,
    SamRefineConfig,
    Section,
    SegmentConfig,
    SourceConfig,
    SyntheticConfig,
    ThresholdsConfig,
    TrainConfig,
    TtaCode,
    WeightsConfig,
)

__all__ = [
    "OUTPUT_INPUTS",
    "AblateConfig",
    "CacheConfig",
    "CellposeSegmentConfig",
    "ChecksConfig",
    "ClassicalSegmentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "ExternalConfig",
    "FetchItem",
    "FoldsConfig",
    "HpaCellSegConfig",
    "ImageModelConfig",
    "InferConfig",
    "Inputs",
    "KaggleConfig",
    "MilConfig",
    "ModelConfig",
    "Output",
    "PathsConfig",
    "PostprocessConfig",
    "RefineConfig",
    "SamRefineConfig",
    "Section",
    "SegmentConfig",
    "SourceConfig",
    "SyntheticConfig",
    "ThresholdsConfig",
    "TrainConfig",
    "TtaCode",
    "WeightsConfig",
    "all_keys",
    "changed_settings",
    "deep_merge",
    "describe_keys",
    "load_config",
    "parse_overrides",
    "save_config",
]
