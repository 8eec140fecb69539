"""The one schema for params.yaml.

Every stage calls ``load_params("<stage>")`` first: it validates the shared top-level keys and that stage's section
only (so a typo in ``evaluate`` does not stop ``clean``), and turns any problem into one line naming the exact key
path, the bad value and what is allowed. Unknown keys are errors everywhere: a misspelt option silently ignored is the
worst kind of bug in a pipeline that costs GPU-days.
"""
from pipeline.params.data import CleanParams, ShardParams, SplitFractions, TokenizerParams
from pipeline.params.evaluate import ClassificationSuite, EvaluateParams, ExportParams, ProbeParams, RetrievalSuite
from pipeline.params.loading import PARAMS_FILE, SECTIONS, SHARED_KEYS, Shared, StageParams, load_params, read_yaml
from pipeline.params.pretrain import EmbeddingsParams, OptimizerParams, PretrainParams, SeqLenWarmupParams
from pipeline.params.sources import DownloadParams, LocalSource, PypiSource, Source, UrlSource

__all__ = ["ClassificationSuite", "CleanParams", "DownloadParams", "EmbeddingsParams",
           "EvaluateParams", "ExportParams", "LocalSource", "OptimizerParams",
           "PARAMS_FILE", "PretrainParams", "ProbeParams", "PypiSource", "RetrievalSuite", "SECTIONS", "SHARED_KEYS",
           "SeqLenWarmupParams", "ShardParams", "Shared", "Source", "SplitFractions", "StageParams", "TokenizerParams",
           "UrlSource", "load_params", "read_yaml"]
