"""The agent's configuration: a TOML file, one table per concern, every key with its default.

Each section is a ``msgspec.Struct``; the field's default is the documented default and the
``doc`` metadata says what it means. ``fastcompute config`` prints the whole file with its
comments, so the documentation cannot drift from the code. Unknown keys are errors: a typo
in a config file must not silently fall back to a default, and keys that take one of a few
words are ``Literal`` types, so that a misspelt value is an error at start-up naming the key.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec


def _doc(text: str) -> msgspec.Meta:
    return msgspec.Meta(description=text)


class AgentConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[agent]: sockets, state and concurrency."""

    host: Annotated[str, _doc("This host's name as reported in host.info; empty = the machine's hostname")] = ""
    control: Annotated[str, _doc("ZeroMQ ROUTER endpoint for requests")] = "tcp://127.0.0.1:7780"
    events: Annotated[str, _doc("ZeroMQ PUB endpoint for events")] = "tcp://127.0.0.1:7781"
    state_dir: Annotated[str, _doc("Directory for the SQLite store, disks and logs")] = "/var/lib/fastcompute"
    max_frame_bytes: Annotated[int, _doc("Requests larger than this are refused undecoded")] = 1 << 20
    max_message_bytes: Annotated[int, _doc("A peer sending a frame larger than this is disconnected without a reply (ZeroMQ's MAXMSGSIZE); frames between max_frame_bytes and this get BAD_REQUEST")] = 64 << 20
    idempotency_window_s: Annotated[float, _doc("How long a mutating request's reply is kept for retries")] = 600.0
    idempotency_max_bytes: Annotated[int, _doc("Memory the retry window may hold (replies and their keys); past it the oldest replies are read back from the store when retried")] = 64 << 20
    max_concurrent_builds: Annotated[int, _doc("Spawns that may be building at once (Nova's max_concurrent_builds)")] = 64
    worker_threads: Annotated[int, _doc("Threads for blocking file work and real-hypervisor calls (the test driver uses one)")] = 4
    max_inflight_requests: Annotated[int, _doc("Requests in flight before new ones get BUSY")] = 4096
    max_inflight_per_peer: Annotated[int, _doc("Requests in flight from one connection before its new ones get BUSY")] = 1024
    peer_send_queue: Annotated[int, _doc("Replies queued for one connection that does not read them; more are dropped (ZeroMQ SNDHWM, in messages)")] = 1000
    peer_receive_queue: Annotated[int, _doc("Requests queued from one connection before the agent stops reading it (ZeroMQ RCVHWM, in messages)")] = 1000
    sync_power_state_interval_s: Annotated[float, _doc("Period of the power-state sync with the hypervisor")] = 10.0
    resources_interval_s: Annotated[float, _doc("host.resources is published at least this often")] = 10.0
    log_level: Annotated[Literal["DEBUG", "INFO", "WARNING", "ERROR"], _doc("DEBUG, INFO, WARNING or ERROR")] = "INFO"


class ClientGrant(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of ``[[security.clients]]``: what one CURVE client key may act for."""

    key: Annotated[str, _doc("Z85 public key of the client, or the path of its *.key file")]
    role: Annotated[Literal["admin", "member", "reader"], _doc("admin: every op; member: instance ops; reader: instance reads")]
    projects: Annotated[list[str], _doc("Projects the role applies to; \"*\" = every project (ignored for admin)")] = (
        msgspec.field(default_factory=list)
    )


class SecurityConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[security]: CURVE and who may do what. Without a server key the agent binds only loopback or ipc://, and every client is admin."""

    server_secret_key_file: Annotated[str, _doc("CURVE secret key file of the agent (from `fastcompute keys`); empty = no CURVE")] = ""
    client_public_keys: Annotated[list[str], _doc("Z85 public keys of the clients allowed to connect, as admins (every op, every project)")] = (
        msgspec.field(default_factory=list)
    )
    client_public_keys_dir: Annotated[str, _doc("Directory of *.key public key files (from `fastcompute keys`), also allowed as admins")] = ""
    clients: Annotated[list[ClientGrant], _doc("Tenant keys, as [[security.clients]] tables {key, role: admin|member|reader, projects: [..]}; a key may have several. Keys of client_public_keys and client_public_keys_dir are admin")] = (
        msgspec.field(default_factory=list)
    )


class HypervisorConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[hypervisor]: the libvirt connection and domain defaults."""

    uri: Annotated[str, _doc("libvirt URI; test:///default is libvirt's in-process test hypervisor")] = "test:///default"
    domain_type: Annotated[Literal["auto", "qemu", "kvm"], _doc("Domain type for qemu:// URIs: qemu (TCG), kvm (falls back to qemu, with a warning, where /dev/kvm is missing or libvirt offers no KVM domain), or auto (kvm where both are there, else qemu); the choice and its reason are logged at start. Not auto by default: some hosts have a /dev/kvm that cannot run ordinary guests (docs/GUESTS.md)")] = "qemu"
    cpu_mode: Annotated[Literal["auto", "host-model", "host-passthrough", "custom"], _doc("Guest CPU: host-model (the host CPU's model and features, migratable), host-passthrough (the host CPU as it is), custom (cpu_models[0] with cpu_model_extra_flags), or auto: host-model on kvm, custom on qemu (TCG: cpu_models[0], else qemu64, QEMU's own TCG model) and host-model on the test hypervisor. A mode other than auto that libvirt reports unsupported for the domain type stops the agent at start; auto then falls back to the custom model")] = "auto"
    cpu_models: Annotated[list[str], _doc("CPU models for cpu_mode custom, e.g. ['Haswell-noTSX']; the first is used (it must exist: libvirt's fallback is forbid)")] = msgspec.field(default_factory=list)
    cpu_model_extra_flags: Annotated[list[str], _doc("CPU features every guest must have besides its model's, e.g. ['pcid', 'avx2'] (Nova's cpu_model_extra_flags); a flavor's required HW_CPU_X86_* traits add their own per guest")] = msgspec.field(default_factory=list)
    shutdown_timeout_s: Annotated[float, _doc("Graceful (ACPI) shutdown wait before a forced stop")] = 60.0
    guest_agent_timeout_s: Annotated[float, _doc("How long a guest's QEMU guest agent has to answer the ping before instance.set_password, quiesce and unquiesce; no answer: CONFLICT (the guest runs no guest agent)")] = 5.0
    guest_agent_command_timeout_s: Annotated[float, _doc("How long the guest agent has to carry out set_password, a file-system freeze or thaw once it answered the ping")] = 60.0
    volume_detach_timeout_s: Annotated[float, _doc("How long a running guest has to release a volume being detached (the request is sent up to three times in that while); a guest that does not is a HYPERVISOR_ERROR and the volume stays attached")] = 30.0


class ResourcesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[resources]: what of the host may be given to guests (Nova's defaults)."""

    cpu_allocation_ratio: Annotated[float, _doc("VCPU over-subscription ratio")] = 16.0
    ram_allocation_ratio: Annotated[float, _doc("MEMORY_MB over-subscription ratio")] = 1.5
    disk_allocation_ratio: Annotated[float, _doc("DISK_GB over-subscription ratio")] = 1.0
    reserved_host_cpus: Annotated[int, _doc("VCPUs kept for the host")] = 0
    reserved_host_memory_mb: Annotated[int, _doc("MiB kept for the host")] = 512
    reserved_host_disk_mb: Annotated[int, _doc("MiB of disk kept for the host")] = 0
    disk_gb: Annotated[int, _doc("DISK_GB total; 0 = the size of the file system holding state_dir")] = 0
    cpu_dedicated_set: Annotated[str, _doc("Host CPUs for pinned guests (PCPU), e.g. '4-15'; empty = none")] = ""
    cpu_shared_set: Annotated[str, _doc("Host CPUs for unpinned guests (VCPU); empty = all not dedicated")] = ""
    custom_traits: Annotated[list[Annotated[str, msgspec.Meta(pattern=r"^CUSTOM_[A-Z0-9_]{1,248}\Z")]], _doc("Traits this host reports besides its CPU features (Placement's CUSTOM_* names, e.g. CUSTOM_GPU), for schedulers to require or forbid")] = msgspec.field(default_factory=list)
    reserved_huge_pages: Annotated[list[str], _doc("Huge pages kept for the host, as Nova writes them: 'node:0,size:2048,count:64' (size in KiB, or with a unit: 2MB, 1GB)")] = msgspec.field(default_factory=list)


class QuotaConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[quota]: per-project limits; -1 = unlimited."""

    instances: Annotated[int, _doc("Instances per project")] = -1
    cores: Annotated[int, _doc("vCPUs per project")] = -1
    ram_mb: Annotated[int, _doc("MiB of guest memory per project")] = -1


class ImagesConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[images]: image sources, the base-image cache and instance disks."""

    disk_mode: Annotated[Literal["cow", "flat"], _doc("cow: qcow2 overlay on the cached base; flat: a private copy")] = "cow"
    glance_endpoint: Annotated[str, _doc("Image service (Glance v2) URL for image ids, e.g. http://glance:9292; empty = ids refused")] = ""
    glance_token: Annotated[str, _doc("X-Auth-Token sent to the Image service; empty = none")] = ""
    glance_headers: Annotated[list[str], _doc("Extra 'Name: value' headers for the Image service (e.g. X-Project-Id without Keystone)")] = (
        msgspec.field(default_factory=list)
    )
    ca_file: Annotated[str, _doc("CA bundle for https image sources; empty = the system's")] = ""
    file_roots: Annotated[list[str], _doc("Directories file:// images may come from (no symbolic link below a root is followed); empty = file:// images refused")] = (
        msgspec.field(default_factory=list)
    )
    http_sources: Annotated[list[str], _doc("Where http(s) images (and their redirects) may come from: URL prefixes (https://mirror:8443/pub/: scheme, host and port equal, path under it) or host names (images.example.com: any port, http or https); empty = http(s) images refused")] = (
        msgspec.field(default_factory=list)
    )
    connect_timeout_s: Annotated[float, _doc("Connecting to an image server gives up after this")] = 10.0
    read_timeout_s: Annotated[float, _doc("A download that receives nothing for this long is abandoned; also the window over which min_download_rate is measured")] = 30.0
    download_timeout_s: Annotated[float, _doc("Overall deadline of one download, from connecting to the last byte: a longer one is abandoned")] = 3600.0
    min_download_rate: Annotated[int, _doc("Bytes per second a download must average over each read_timeout_s, or it is abandoned; 0 = only a full stall is")] = 65536
    max_image_bytes: Annotated[int, _doc("Images larger than this (downloaded bytes or virtual size) are refused")] = 100 << 30
    max_concurrent_downloads: Annotated[int, _doc("Image downloads at once, each in a thread of its own; more wait")] = 4
    disk_threads: Annotated[int, _doc("Threads that make and remove instance disks (copies in flat mode share them)")] = 2
    cache_max_age_s: Annotated[float, _doc("The cleaner removes bases no instance has used for this long")] = 86400.0
    cleaner_interval_s: Annotated[float, _doc("Period of the base-image cleaner; 0 = off")] = 2400.0


class NetworkConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[network]: bridges, taps and security groups."""

    physical_interface: Annotated[str, _doc("Host interface that carries VLAN networks (<iface>.<vlan> sub-interfaces); empty = VLAN ports are refused")] = ""
    default_mtu: Annotated[int, _doc("MTU of bridges and taps when the port's network gives none")] = 1500
    bridge_prefix: Annotated[str, _doc("Name prefix of the bridges made for networks without a given bridge (Neutron's brq)")] = "brq"
    tap_prefix: Annotated[str, _doc("Name prefix of port taps; the rest of the 15 characters is the port id (os-vif's tap)")] = "tap"
    owner: Annotated[str, _doc("Name of the agent's nftables tables (bridge and inet) and the tag in the alias of every link it makes; only those are ever removed")] = "fastcompute"
    conntrack_zones_from: Annotated[int, msgspec.Meta(ge=0, le=65535), _doc("Connection tracking zones: each bridge with ports gets its own, numbered up from here, so that networks with the same addresses never share connection state; 0 = no zones (all networks share one)")] = 4096


class MetadataConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[metadata]: the metadata service guests reach at 169.254.169.254 (see docs/NETWORK.md)."""

    enabled: Annotated[bool, _doc("Answer guests' requests to http://169.254.169.254/ (OpenStack and EC2 paths) for ports with port security")] = True
    address: Annotated[str, _doc("Link-local IPv4 address the listeners bind on each bridge with ports; requests to 169.254.169.254:80 are DNATed to it")] = "169.254.169.252"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535), _doc("TCP port of the listeners (Nova's metadata API port)")] = 8775
    max_request_bytes: Annotated[int, msgspec.Meta(ge=256, le=65536), _doc("Largest request head accepted; a longer one is answered 431 and the connection closed")] = 4096
    idle_timeout_s: Annotated[float, msgspec.Meta(gt=0), _doc("A keep-alive connection idle for this long is closed")] = 30.0


class GuestConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[guest]: what guests are told at boot (config drive, metadata)."""

    config_drive: Annotated[bool, _doc("Give every guest a config drive (a spawn's config_drive says otherwise for its own)")] = True
    availability_zone: Annotated[str, _doc("The availability zone this host is in, as guests' metadata reports it")] = "nova"
    config_drive_skip_versions: Annotated[list[str], _doc("EC2 metadata versions left out of config drives (the metadata service serves them all); Nova's default")] = msgspec.field(
        default_factory=lambda: ["1.0", "2007-01-19", "2007-03-01", "2007-08-29", "2007-10-10", "2007-12-15",
                                 "2008-02-01", "2008-09-01"])


class ConsoleConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[console]: guests' consoles, opened through instance.get_console and the agent's console proxy (see docs/GUESTS.md)."""

    enabled: Annotated[bool, _doc("Give guests a VNC server and an interactive serial console, and run the console proxy. Off by default: the proxy takes a TCP port (listen)")] = False
    listen: Annotated[str, _doc("HOST:PORT the console proxy listens on (noVNC's page and websockets, the serial console's websockets)")] = "127.0.0.1:6080"
    base_url: Annotated[str, _doc("The proxy as clients reach it, e.g. https://console.example.com:6080 (behind a TLS terminator); empty = http://LISTEN")] = ""
    address: Annotated[str, _doc("Host address the guests' VNC (and SPICE) servers listen on; the proxy connects there, clients never do")] = "127.0.0.1"
    spice: Annotated[bool, _doc("Also give guests a SPICE server on address, opened through the proxy by get_console type spice-html5 (or by SPICE clients an operator points at it); only where QEMU has SPICE (Debian's does), or guests do not start")] = False
    token_ttl_s: Annotated[float, msgspec.Meta(gt=0), _doc("A console URL's token must be used within this long (once; Nova's token_ttl)")] = 600.0
    socket_dir: Annotated[str, _doc("Directory (made 0700) of the guests' serial console sockets, {uuid}.sock; short, as a unix socket's path must be")] = "/run/fastcompute/consoles"
    novnc_dir: Annotated[str, _doc("Directory of noVNC's files (vnc_lite.html, core/, vendor/), served by the proxy; Debian's novnc package puts them here")] = "/usr/share/novnc"
    allowed_origins: Annotated[list[str], _doc("Origins (scheme://host[:port]) besides base_url's whose pages may open a console websocket; a browser's websocket from any other Origin is refused (403) before its token is looked at")] = msgspec.field(default_factory=list)
    spice_html5_dir: Annotated[str, _doc("Directory of spice-html5's files (spice_auto.html and its scripts), served by the proxy under /spice-html5/ for get_console type spice-html5 (needs spice = true); Debian's spice-html5 package puts them here")] = "/usr/share/spice-html5"


class StatsConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[stats]: sampling and metrics."""

    interval_s: Annotated[float, _doc("Period of host.stats sampling and publication; 0 = off")] = 5.0
    metrics: Annotated[str, _doc("HOST:PORT of the Prometheus /metrics endpoint; empty = off")] = ""
    metrics_max_connections: Annotated[int, msgspec.Meta(ge=1), _doc("Open /metrics connections; past it the one idle longest is closed (one thread serves them all)")] = 64
    metrics_idle_timeout_s: Annotated[float, _doc("A /metrics connection that sends no complete request for this long is closed")] = 10.0
    source: Annotated[Literal["auto", "cgroup", "libvirt"], _doc("Where guest stats come from: auto = the QEMU process's cgroup when found, else libvirt's getAllDomainStats; cgroup; libvirt")] = "auto"
    qemu_run_dir: Annotated[str, _doc("Directory of libvirt's QEMU pid files (one {domain name}.pid per guest), used to find a guest's cgroup")] = "/run/libvirt/qemu"
    loop_lag_interval_s: Annotated[float, _doc("Period of the event-loop lag probe behind the event_loop_lag metric; 0 = off")] = 0.5


class PlacementConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[placement]: OpenStack Placement, kept in step with this host (empty url = off)."""

    url: Annotated[str, _doc("Placement endpoint, e.g. http://placement:8778; empty = no Placement")] = ""
    token: Annotated[str, _doc("X-Auth-Token sent to Placement (noauth2 takes any; Keystone needs a real token)")] = "admin"
    microversion: Annotated[str, _doc("OpenStack-API-Version sent to Placement; 1.39 or later")] = "1.39"
    user_id: Annotated[str, _doc("user_id written with every allocation (the agent knows projects, not users)")] = "fastcompute"
    connect_timeout_s: Annotated[float, _doc("Connecting to Placement gives up after this")] = 5.0
    timeout_s: Annotated[float, _doc("A Placement request that takes longer is abandoned and retried")] = 30.0
    retry_max_s: Annotated[float, _doc("Longest wait between retries while Placement is unreachable (backoff doubles up to it)")] = 5.0
    batch_size: Annotated[int, _doc("Allocations written in one POST /allocations")] = 200


class ComputeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[compute]: instance workflows (soft delete, shelve, moves: Nova's resize options)."""

    reclaim_instance_interval_s: Annotated[float, _doc("Soft delete (Nova's reclaim_instance_interval): above 0, instance.delete stops a launched instance and keeps it soft_deleted, its resources still held, for this many seconds (instance.restore brings it back) before a periodic task deletes it; instance.force_delete deletes at once. 0 = every delete is at once")] = 0.0
    shelved_offload_time_s: Annotated[float, _doc("How long a shelved instance keeps its domain, disk, ports and claim before they are given back (shelved_offloaded); 0 = at once, -1 = never (Nova's shelved_offload_time)")] = 0.0
    allow_resize_to_same_host: Annotated[bool, _doc("Let instance.resize keep the instance on this host (Nova's option of the same name); off: a resize needs another host as destination")] = False
    resize_confirm_window_s: Annotated[float, msgspec.Meta(ge=0), _doc("A resized or migrated instance not confirmed or reverted within this long is confirmed by its new host (Nova's resize_confirm_window); 0 = never")] = 0.0


class MigrationPeer(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One entry of ``[[migration.peers]]``: another agent instances may move to or from."""

    host: Annotated[str, _doc("The peer's host name, as its [agent] host (what instance.migrate names as destination)")]
    control: Annotated[str, _doc("The peer's control endpoint, e.g. tcp://10.0.0.2:7780")]
    public_key: Annotated[str, _doc("The peer's CURVE public key (Z85, or the path of its *.key file): the key its agent serves with and calls peers with; empty only without CURVE")] = ""


class MigrationConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """[migration]: the agents instances move between (see docs/MIGRATION.md)."""

    peers: Annotated[list[MigrationPeer], _doc("The peer agents, as [[migration.peers]] tables {host, control, public_key}: the only agents this one calls, and (with CURVE) the only keys that may call its migration.* ops")] = msgspec.field(default_factory=list)
    client_secret_key_file: Annotated[str, _doc("This agent's CURVE key pair for calling peers (from `fastcompute keys`); empty = [security] server_secret_key_file, so that one key pair names the agent both ways")] = ""
    call_timeout_s: Annotated[float, msgspec.Meta(gt=0), _doc("A call to a peer (a claim, a chunk of a disk, a confirm) with no answer within this long has failed")] = 60.0
    finish_timeout_s: Annotated[float, msgspec.Meta(gt=0), _doc("How long the destination has to copy the disks and start the instance")] = 3600.0
    chunk_bytes: Annotated[int, msgspec.Meta(ge=4096, le=32 << 20), _doc("Bytes of a disk per read from the source (holes are skipped)")] = 4 << 20
    retry_interval_s: Annotated[float, msgspec.Meta(gt=0), _doc("Period of the retries of an interrupted move's steps and of the resize_confirm_window check")] = 5.0
    test_hold_step: Annotated[Literal["", "prep", "migrating", "finishing", "copying", "live_prep", "live_migrating", "switching"], _doc("Tests only: the move step (prep, migrating, finishing, copying; of a live move live_prep, live_migrating, switching) at which this agent waits test_hold_s after recording it, so that a test can kill it there; empty = never")] = ""
    test_hold_s: Annotated[float, msgspec.Meta(ge=0), _doc("Tests only: see test_hold_step")] = 0.0
    evacuate_probe_s: Annotated[float, msgspec.Meta(gt=0), _doc("How long an agent asked to evacuate an instance waits for its source agent's answer before it takes that host for down (an answer refuses the evacuate); also the wait for each peer's answer when a restarted agent asks which of its instances were evacuated")] = 5.0
    libvirt_uri: Annotated[str, _doc("The libvirt URI a peer's libvirtd uses to reach this host's for a live migration (peer to peer), e.g. qemu+tcp://10.0.0.2/system; empty = [hypervisor] uri")] = ""
    address: Annotated[str, _doc("The address this host receives a live migration's memory and disks on; empty = the host part of libvirt_uri")] = ""
    downtime_start_ms: Annotated[int, msgspec.Meta(ge=1), _doc("Live migration: the longest the guest may be stopped at the switch-over at first")] = 50
    downtime_max_ms: Annotated[int, msgspec.Meta(ge=1), _doc("Live migration: the most that limit is raised to while the migration does not converge")] = 500
    downtime_steps: Annotated[int, msgspec.Meta(ge=0), _doc("Live migration: in how many steps the limit goes from downtime_start_ms to downtime_max_ms (one per pass over memory that did not shrink what is left)")] = 10
    fallback: Annotated[Literal["none", "auto-converge", "post-copy"], _doc("Live migration: what a migration that does not converge falls back to: auto-converge (QEMU throttles the guest's vCPUs) or post-copy (switch over, fetch the rest on demand)")] = "auto-converge"
    fallback_after_s: Annotated[float, msgspec.Meta(ge=0), _doc("Live migration: when post-copy is taken")] = 30.0
    live_timeout_s: Annotated[float, msgspec.Meta(gt=0), _doc("Live migration: a migration not done after this long is aborted (the guest goes on at the source)")] = 600.0
    bandwidth_mib_s: Annotated[int, msgspec.Meta(ge=0), _doc("Live migration: the transfer's cap in MiB/s; 0 = none")] = 0
    console_copy_bytes: Annotated[int, msgspec.Meta(ge=0, le=16 << 20), _doc("Live migration: how much of the end of the guest's console log the destination gets before the move (so a console tail there still shows earlier lines)")] = 1 << 20


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration file."""

    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    security: SecurityConfig = msgspec.field(default_factory=SecurityConfig)
    hypervisor: HypervisorConfig = msgspec.field(default_factory=HypervisorConfig)
    resources: ResourcesConfig = msgspec.field(default_factory=ResourcesConfig)
    quota: QuotaConfig = msgspec.field(default_factory=QuotaConfig)
    images: ImagesConfig = msgspec.field(default_factory=ImagesConfig)
    network: NetworkConfig = msgspec.field(default_factory=NetworkConfig)
    metadata: MetadataConfig = msgspec.field(default_factory=MetadataConfig)
    guest: GuestConfig = msgspec.field(default_factory=GuestConfig)
    console: ConsoleConfig = msgspec.field(default_factory=ConsoleConfig)
    stats: StatsConfig = msgspec.field(default_factory=StatsConfig)
    placement: PlacementConfig = msgspec.field(default_factory=PlacementConfig)
    compute: ComputeConfig = msgspec.field(default_factory=ComputeConfig)
    migration: MigrationConfig = msgspec.field(default_factory=MigrationConfig)


class ConfigError(ValueError):
    """The config file cannot be read or has a wrong key or value."""


def load(path: str | Path | None) -> Config:
    """Read a TOML config file (or the defaults when ``path`` is None)."""
    if path is None:
        return Config()
    try:
        raw = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"config {path}: {exc}") from exc


def with_overrides(cfg: Config, section: str, **values: Any) -> Config:
    """Return ``cfg`` with the given keys of one section replaced (None values are ignored)."""
    given = {k: v for k, v in values.items() if v is not None}
    if not given:
        return cfg
    new_section = msgspec.structs.replace(getattr(cfg, section), **given)
    return msgspec.structs.replace(cfg, **{section: new_section})


def render_defaults() -> str:
    """The default configuration as a commented TOML file."""
    lines = ["# fastcompute agent configuration; every key with its default.", ""]
    for section_field in msgspec.structs.fields(Config):
        section_type = section_field.type
        lines.append(f"# {(getattr(section_type, '__doc__', None) or '').strip()}")
        lines.append(f"[{section_field.name}]")
        hints = msgspec.inspect.type_info(section_type)
        assert isinstance(hints, msgspec.inspect.StructType)
        for f in hints.fields:
            desc = ""
            if isinstance(f.type, msgspec.inspect.Metadata):
                desc = str((f.type.extra_json_schema or {}).get("description", ""))
            lines.append(f"# {desc}")
            default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
            lines.append(f"{f.name} = {_toml_value(default)}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)
