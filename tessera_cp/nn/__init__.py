"""tessera_cp.nn: Modules and the ops they are built from, by family (one file each)."""
from . import init
from .layers import Dropout, Embedding, Linear, dropout, embedding, linear
from .module import Buffer, Module, ModuleList, Parameter, Sequential
from .serialization import load_safetensors, save_safetensors
from .loss import (fused_linear_cross_entropy, log_softmax_stable, softmax_cross_entropy, stable_contrastive_loss,
                   stable_cross_entropy, stable_max_margin_loss)
from .attention import (alibi_slopes, attention, chunked_attention, flash_attention, grouped_query_attention,
                        multi_query_attention)
from .casted import (CastedEmbedding, CastedLinear, CastedSparseEmbedding, casted_linear, int8_matmul,
                     quantize_swiglu_weights, swiglu_quantized)
from .activation import (SwiGLU, gelu, silu, swiglu, swiglu_activation, swiglu_fused, swiglu_memory_efficient,
                         swish)
from .norm import RMSNorm, rms_norm, stable_rms_norm
from .position import LearnedPositionalEmbedding, alibi_bias
from .rope import (RotaryEmbedding, apply_rope, apply_rotary_pos_emb, cos_sin_embedding, dynamic_rope, rope_cache,
                   rope_frequencies, rotary_embedding)
from .kv_cache import KVCacheFullError, PagedKVCache, decode_attention, paged_decode_attention
from .mla import LatentCache, MultiLatentAttention, mla_cache_report, mla_decode_attention
