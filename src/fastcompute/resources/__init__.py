"""Host resources: the tracker and claims, NUMA constraints and the fitter."""
