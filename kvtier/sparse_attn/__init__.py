"""MInference-style sparse prefill attention: patterns, online estimation, per-head configs, model switch.

- ``patterns``: A-shape, vertical-slash and block-sparse selections, all turned into one
  :class:`~kvtier.kernels.index.SparseIndex` (key blocks read in full + single key columns per 64-row query block);
- ``estimate``: the index of one input from its queries and keys, head by head;
- ``config``: per-head patterns and the per-model JSON file (``configs/smollm2-135m.json`` ships);
- ``search``: the offline per-head search that writes such a file;
- ``metrics``: recall, the share of dense attention mass an index keeps;
- ``integration``: the switch that makes a transformers Llama-family model prefill sparsely.

The kernels that compute attention over an index are in :mod:`kvtier.kernels`. See docs/sparse_attention.md.
"""

from kvtier.kernels.index import SparseAttentionError, SparseIndex
from kvtier.sparse_attn.config import HeadPattern, SparseConfig, SparseConfigError, load_config
from kvtier.sparse_attn.estimate import estimate_index
from kvtier.sparse_attn.integration import disable_sparse_prefill, enable_sparse_prefill

__all__ = ["HeadPattern", "SparseAttentionError", "SparseConfig", "SparseConfigError", "SparseIndex",
           "disable_sparse_prefill", "enable_sparse_prefill", "estimate_index", "load_config"]
