"""Collectives around the kernels: topology, sequence sharding, ring attention,
Ulysses, LASP-2/2H and communication accounting. Never imports ltrain/ (only
ltrain.kernels)."""
