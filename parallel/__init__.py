"""Collectives around the kernels: topology, sequence sharding, ring attention,
Ulysses, LASP-2/2H and communication accounting. Never imports ltrain/ (only
ltrain.kernels)."""

from .comm import CommMeter
from .lasp2 import lasp2_linear_attention
from .lasp2h import lasp2h_attention, lasp2h_sparse_attention
from .ring import ring_attention
from .sharding import gather_sequence, shard_sequence
from .ulysses import ulysses_attention
