"""The libvirt backend: the only place that knows libvirt (connection, domain XML)."""
