"""Ports on Linux bridges, with their security groups enforced in nftables.

The agent plugs its instances' ports itself (what os-vif and Neutron's Linux bridge agent do
for Nova): a bridge per network (made when missing), a VLAN sub-interface of the configured
physical interface when the network has a VLAN, and one tap per port named from the port id.
Links are made through netlink (pyroute2); every link the agent makes carries an alias
``<owner>:<kind>:...`` so that unplugging and reconciliation remove only what the agent made.

Security groups live in two nftables tables named ``<owner>`` (families ``bridge`` and
``inet``), changed by one atomic transaction per batch of changes (one plug or unplug alone,
or all of those queued together in a storm) through the in-process libnftables binding. The
kernel has no bridge-family conntrack here, so the work is split in two:

* The bridge table sees bridge ports. ``prerouting`` writes into the packet mark the number
  of the sending port's egress rule chain (map ``egress_mark``, keyed by input interface) and
  sends the packets of our ports to the ``spoof`` chain, which drops any packet whose (port,
  MAC), (port, IPv4), (port, IPv6) or ARP sender is not in the port sets, VLAN-tagged frames,
  and DHCP-server and router-advertisement packets. ``forward`` then rewrites the mark to the
  number of the receiving port's ingress chain (map ``ingress_mark``), or clears it.
* br_netfilter hands bridged IP packets to the ``inet`` hooks, where conntrack runs. inet
  ``prerouting`` accepts established and related packets, drops invalid ones and jumps, by
  the mark, through the ``egress`` verdict map to the sender's rule chain; inet ``forward``
  does the same with the ``ingress`` map and the receiver's chain. Rule chains hold the allow
  rules of a set of groups and end in drop.

Every per-port fact is an element of a plain set or map and every lookup a hash lookup, so a
packet's path and the cost of adding a port do not grow with the number of ports. Rule chains
are named by a digest of their rules and shared by every port with the same rules; the
verdict maps hold one element per chain, not per port, because the kernel re-validates every
jump of a verdict map on each commit. A port that joins rule sets in use costs five element
insertions. (libnftables 1.0.6 lists every chain before adding a rule or element, so a new
rule set costs more as rule sets accumulate.) Each rule chain's first rule carries its
digest, which is how reconciliation tells an intact chain from a damaged one.

The package, along its seams: ``api`` (the :class:`Network` service and the record of plugged
ports), ``queue`` (changes and their batching), ``ports`` (port checks beyond the wire struct
and the conflict index), ``links`` (names, taps, bridges, VLANs over netlink), ``netlink`` and
``conntrack`` (hand-packed requests), and ``nft/``: ``libnft`` (the libnftables binding),
``encoding`` (the sets and their elements), ``render`` (the tables' commands), ``plan`` (pure:
wanted and listed state to commands) and ``apply`` (runs them and keeps the tables' state).
"""

from fastcompute.network.api import Network, ReconcileReport
from fastcompute.network.nft.libnft import Nft, NftError
from fastcompute.network.nft.render import Renderer, number_chains, ruleset, sg_chain
from fastcompute.network.ports import PluggedPort, PortIndex, check_ports, check_rule, decode_ports

__all__ = [
    "Network",
    "Nft",
    "NftError",
    "PluggedPort",
    "PortIndex",
    "ReconcileReport",
    "Renderer",
    "check_ports",
    "check_rule",
    "decode_ports",
    "number_chains",
    "ruleset",
    "sg_chain",
]
