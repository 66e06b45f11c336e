# cython: language_level=3
"""The compiled core: hot paths over plain data (ints, bytes, arrays).

It imports nothing from the package and knows nothing of RPC or libvirt; each concept lives in
its own include file under ``core/`` and its Python callers translate to and from the agent's
types.
"""
include "core/copy.pxi"
include "core/sampler.pxi"
include "core/cpuset.pxi"
include "core/numa_fit.pxi"
