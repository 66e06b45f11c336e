"""nftables: the libnftables binding, the sets and their encoding, rendering, planning and applying."""
