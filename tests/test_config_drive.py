"""Config drives through the agent, read back by other people's code: the ISO by ``isoinfo``
(genisoimage's reader) and the tree by cloud-init's own ``read_config_drive`` and
``convert_net_json``, run by the system Python where Debian's cloud-init package lives."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import uuid as uuid_mod
from pathlib import Path
from typing import Any

import msgspec
import pytest
from agent_fixtures import AgentProcess, call_error, spawn_args
from network_fixtures import remove_owned

from fastcompute.compute import configdrive
from fastcompute.errors import BadRequest
from fastcompute.protocol import Flavor, Image, InstanceRecord, KeyPair
from fastcompute.protocol.ports import Port

CLOUD_INIT = "/usr/lib/python3/dist-packages"
pytestmark = pytest.mark.skipif(not Path(CLOUD_INIT, "cloudinit").is_dir(),
                                reason="Debian's cloud-init is not installed")

SSH_KEY = ("ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519" + bytes(range(36))).decode()
           + " alice@laptop")
CERT = ("-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(range(200))).decode()
        + "-----END CERTIFICATE-----\n")
# Binary user data (gzip-like header, a NUL, bytes >= 0x80): it must arrive byte for byte.
USER_DATA = b"\x1f\x8b#cloud-config\x00\xff\xfe" + "ünïcode\n".encode() * 10

_READER = r"""
import base64, copy, json, sys
sys.path.insert(0, sys.argv[1])
from cloudinit.sources.DataSourceConfigDrive import read_config_drive
from cloudinit.sources.helpers.openstack import convert_net_json
r = read_config_drive(sys.argv[2])
macs = json.loads(sys.argv[3])
print(json.dumps({
    "version": r["version"], "metadata": r["metadata"],
    "userdata": base64.b64encode(r["userdata"] or b"").decode(),
    "vendordata": r.get("vendordata"), "vendordata2": r.get("vendordata2"),
    "networkdata": r.get("networkdata"), "ec2": r.get("ec2-metadata"),
    # convert_net_json changes what it is given
    "network_config": convert_net_json(copy.deepcopy(r.get("networkdata")), known_macs=macs) if macs else None,
}, default=str))
"""


def extract(iso: Path, dest: Path) -> dict[str, str]:
    """Every file of ``iso`` into ``dest`` as isoinfo reads it with Rock Ridge names; returns
    the volume descriptor's fields."""
    listing = subprocess.run(["isoinfo", "-R", "-f", "-i", str(iso)], capture_output=True, text=True,
                             check=True).stdout.split()
    dirs = {p.rsplit("/", 1)[0] for p in listing}
    for p in listing:
        if p in dirs:
            continue
        target = dest / p.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(subprocess.run(["isoinfo", "-R", "-i", str(iso), "-x", p], capture_output=True,
                                          check=True).stdout)
    info = subprocess.run(["isoinfo", "-d", "-i", str(iso)], capture_output=True, text=True, check=True).stdout
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines()) if v}
    return {**fields, "text": info}


def cloud_init_reads(iso: Path, work: Path, macs: dict[str, str]) -> dict[str, Any]:
    """What cloud-init makes of a config drive (``macs``: the guest's NICs by MAC)."""
    tree = work / f"tree-{uuid_mod.uuid4().hex[:6]}"
    info = extract(iso, tree)
    assert info["Volume id"] == "config-2"
    out = subprocess.run(["/usr/bin/python3", "-c", _READER, CLOUD_INIT, str(tree), json.dumps(macs)],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    result: dict[str, Any] = json.loads(out.stdout)
    result["tree"] = tree
    result["iso_info"] = info
    return result


def drive_of(agent: AgentProcess, uuid: str) -> Path:
    return agent.state_dir / "instances" / uuid / "disk.config"


@pytest.fixture
def net_agent(make_agent: Any) -> Any:
    tag = uuid_mod.uuid4().hex[:6]
    owner = f"fcd{tag}"
    agent = make_agent(config=f'[network]\nowner = "{owner}"\nbridge_prefix = "d{tag}"\ntap_prefix = "c{tag[:3]}"\n'
                              '[guest]\navailability_zone = "az-7"\n')
    yield agent
    if agent.proc is not None and agent.proc.poll() is None:
        agent.terminate()
    remove_owned(owner)


def _port(ip: str, mac: str, net: str, **fixed: Any) -> dict[str, Any]:
    return {"id": f"p-{uuid_mod.uuid4().hex[:8]}", "mac": mac, "network": {"id": net, "mtu": 1450},
            "fixed_ips": [{"ip": ip, "prefix": 24, **fixed}]}


def test_every_field_round_trips_through_cloud_init(net_agent: AgentProcess, image_file: Path,
                                                    tmp_path: Path) -> None:
    agent = net_agent
    p1 = _port("10.91.0.5", "FA:16:3E:00:91:05", "cd1", gateway="10.91.0.1", dns_nameservers=["10.91.0.2", "9.9.9.9"],
               routes=[{"destination": "172.16.0.0/12", "nexthop": "10.91.0.254"}])
    p1["fixed_ips"].append({"ip": "fd00:91::5", "prefix": 64, "gateway": "fd00:91::1"})
    meta = {"role": "web", "dsmode": "local"}
    vendor = {"cloud-init": "#cloud-config\npackages: [htop]\n", "tier": {"gold": True, "n": [1, 2]}}
    args = spawn_args(image_file, name="Web Server 1", wait=True, networks=[p1], metadata=meta,
                      hostname="web-1", user_data=base64.b64encode(USER_DATA).decode(),
                      key_pairs=[{"name": "alice", "type": "ssh", "public_key": SSH_KEY},
                                 {"name": "corp-ca", "type": "x509", "public_key": CERT}],
                      admin_pass="s3cret!", vendor_data=vendor, launch_index=3)
    rec = agent.call("instance.spawn", args)
    assert rec["vm_state"] == "active"
    uuid = rec["uuid"]
    # The secrets are no part of the record replies and events carry.
    shown = json.dumps(agent.call("instance.get", {"uuid": uuid}))
    assert "s3cret!" not in shown and "user_data" not in shown and "admin_pass" not in shown
    drive = drive_of(agent, uuid)
    assert stat.S_IMODE(drive.stat().st_mode) == 0o600
    assert stat.S_IMODE((agent.state_dir / "fastcompute.sqlite").stat().st_mode) == 0o600

    got = cloud_init_reads(drive, tmp_path, {"fa:16:3e:00:91:05": "eth0"})
    assert "Joliet with UCS level 3 found" in got["iso_info"]["text"]
    assert "Rock Ridge signatures version 1 found" in got["iso_info"]["text"]
    assert got["version"] == 2
    md = got["metadata"]
    assert md["uuid"] == md["instance-id"] == uuid
    assert md["name"] == "Web Server 1"
    assert md["hostname"] == md["local-hostname"] == "web-1"
    assert md["launch_index"] == 3
    assert md["availability_zone"] == "az-7"
    assert md["project_id"] == "default"
    assert md["meta"] == meta
    assert md["public_keys"] == {"alice": SSH_KEY}
    assert md["keys"] == [{"name": "alice", "type": "ssh", "data": SSH_KEY},
                          {"name": "corp-ca", "type": "x509", "data": CERT}]
    assert md["admin_pass"] == "s3cret!"
    assert base64.b64decode(got["userdata"]) == USER_DATA
    assert got["vendordata"] == vendor
    assert got["vendordata2"] == {}
    assert got["ec2"]["local-hostname"] == "web-1"
    assert got["ec2"]["public-keys"]["0"]["openssh-key"] == SSH_KEY
    assert got["ec2"]["placement"] == {"availability-zone": "az-7"}
    assert got["ec2"]["local-ipv4"] == "10.91.0.5"
    assert (got["tree"] / "ec2" / "latest" / "user-data").read_bytes() == USER_DATA

    nd = got["networkdata"]
    assert nd["links"] == [{"id": ("tap" + p1["id"])[:14], "vif_id": p1["id"], "type": "bridge", "mtu": 1450,
                            "ethernet_mac_address": "fa:16:3e:00:91:05"}]
    v4, v6 = nd["networks"]
    assert (v4["type"], v4["ip_address"], v4["netmask"], v4["network_id"]) == (
        "ipv4", "10.91.0.5", "255.255.255.0", "cd1")
    assert v4["routes"] == [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.91.0.1"},
                            {"network": "172.16.0.0", "netmask": "255.240.0.0", "gateway": "10.91.0.254"}]
    assert (v6["type"], v6["ip_address"], v6["netmask"]) == ("ipv6", "fd00:91::5", "ffff:ffff:ffff:ffff::")
    assert v6["routes"] == [{"network": "::", "netmask": "::", "gateway": "fd00:91::1"}]
    assert nd["services"] == [{"type": "dns", "address": "10.91.0.2"}, {"type": "dns", "address": "9.9.9.9"}]

    # cloud-init's own network configuration of the guest, from network_data.json
    config = got["network_config"]["config"]
    eth0 = config[0]
    assert (eth0["type"], eth0["name"], eth0["mac_address"], eth0["mtu"]) == (
        "physical", "eth0", "fa:16:3e:00:91:05", 1450)
    s4, s6 = eth0["subnets"]
    assert (s4["type"], s4["address"], s4["netmask"]) == ("static", "10.91.0.5", "255.255.255.0")
    assert {"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.91.0.1"} in s4["routes"]
    assert (s6["type"], s6["address"]) == ("static6", "fd00:91::5")
    assert [c["address"] for c in config[1:] if c["type"] == "nameserver"] == ["10.91.0.2", "9.9.9.9"]

    # Nova's layout: every version cloud-init looks for, files as of the version that added them
    versions = {p.name for p in (got["tree"] / "openstack").iterdir()}
    assert {"latest", "2012-08-10", "2015-10-15", "2016-10-06", "2018-08-27"} <= versions
    assert not (got["tree"] / "openstack" / "2013-04-04" / "network_data.json").exists()
    assert (got["tree"] / "openstack" / "2015-10-15" / "network_data.json").exists()
    assert not (got["tree"] / "openstack" / "2016-06-30" / "vendor_data2.json").exists()
    # and the EC2 versions Nova's drives carry by default
    assert sorted(p.name for p in (got["tree"] / "ec2").iterdir()) == ["2009-04-04", "latest"]

    agent.call("instance.delete", {"uuid": uuid})
    assert not drive.exists()


def test_user_data_of_65535_bytes_is_taken_and_one_more_refused(agent: AgentProcess, image_file: Path,
                                                                tmp_path: Path) -> None:
    most = os.urandom(65535)
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, user_data=base64.b64encode(most).decode()))
    got = cloud_init_reads(drive_of(agent, rec["uuid"]), tmp_path, {})
    assert base64.b64decode(got["userdata"]) == most
    # line breaks, as `base64` writes them, are fine
    wrapped = base64.encodebytes(most[:1000]).decode()
    assert agent.call("instance.spawn", spawn_args(image_file, wait=True, user_data=wrapped))["vm_state"] == "active"
    for bad, reason in ((base64.b64encode(most + b"x").decode(), "65536 bytes decoded"),
                        ("not base64!", "base64"), ("QUJ", "base64")):
        err = call_error(agent, "instance.spawn", spawn_args(image_file, user_data=bad))
        assert isinstance(err, BadRequest) and err.details is not None
        assert err.details["field"] == "args.user_data" and reason in err.message
    assert len(agent.call("instance.list")) == 2


@pytest.mark.parametrize("hostname", ["héllo", "ünï", "пример", "xn--bcher-kva\u200b", "-web", "web-", "a.b",
                                      "web_1", "a" * 64, ""])
def test_hostnames_that_are_not_rfc_1123_labels_are_refused(agent: AgentProcess, image_file: Path,
                                                            hostname: str) -> None:
    err = call_error(agent, "instance.spawn", spawn_args(image_file, hostname=hostname))
    assert isinstance(err, BadRequest) and err.details is not None and err.details["field"] == "args.hostname"
    assert agent.call("instance.list") == []


def test_hostname_defaults_from_the_name(agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    rec = agent.call("instance.spawn", spawn_args(image_file, name="Café Web_Server.1 ", wait=True))
    got = cloud_init_reads(drive_of(agent, rec["uuid"]), tmp_path, {})
    assert got["metadata"]["hostname"] == "cafe-web-server-1"
    assert configdrive.default_hostname("日本", "u-1") == "server-u-1"
    assert configdrive.default_hostname("x" * 80, "u") == "x" * 63


@pytest.mark.parametrize(("key", "field"), [
    ({"name": "k", "type": "ssh", "public_key": SSH_KEY + "\nssh-rsa AAAA evil"}, "args.key_pairs[0].public_key"),
    ({"name": "k", "type": "ssh", "public_key": "ssh-ed25519 !!!"}, "args.key_pairs[0].public_key"),
    ({"name": "k", "type": "ssh", "public_key": "hello"}, "args.key_pairs[0].public_key"),
    ({"name": "k", "type": "x509", "public_key": SSH_KEY}, "args.key_pairs[0].public_key"),
    ({"name": "k", "type": "pgp", "public_key": SSH_KEY}, "args.key_pairs[0].type"),
    ({"name": "k\x1b[2J", "type": "ssh", "public_key": SSH_KEY}, "args.key_pairs[0].name"),
])
def test_malformed_key_pairs_are_refused(agent: AgentProcess, image_file: Path, key: dict[str, str],
                                         field: str) -> None:
    err = call_error(agent, "instance.spawn", spawn_args(image_file, key_pairs=[key]))
    assert isinstance(err, BadRequest) and err.details is not None and err.details["field"] == field


def test_bad_subnet_details_and_vendor_data_are_refused(agent: AgentProcess, image_file: Path) -> None:
    cases = [
        ({"networks": [_port("10.92.0.5", "fa:16:3e:00:92:05", "n", gateway="fd00::1")]},
         "args.networks[0].fixed_ips[0].gateway"),
        ({"networks": [_port("10.92.0.5", "fa:16:3e:00:92:05", "n", dns_nameservers=["dns.example"])]},
         "args.networks[0].fixed_ips[0].dns_nameservers[0]"),
        ({"networks": [_port("10.92.0.5", "fa:16:3e:00:92:05", "n",
                             routes=[{"destination": "10.0.0.0/33", "nexthop": "10.92.0.1"}])]},
         "args.networks[0].fixed_ips[0].routes[0].destination"),
        ({"vendor_data": {"big": "x" * 70000}}, "args.vendor_data"),
        ({"admin_pass": "a\nb"}, "args.admin_pass"),
        ({"config_drive": "yes"}, "args.config_drive"),
    ]
    for over, field in cases:
        err = call_error(agent, "instance.spawn", spawn_args(image_file, **over))
        assert isinstance(err, BadRequest) and err.details is not None and err.details["field"] == field, over


def test_config_drive_off_by_spawn_or_by_config(make_agent: Any, image_file: Path) -> None:
    agent = make_agent(config="[guest]\nconfig_drive = false\n")
    off = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    on = agent.call("instance.spawn", spawn_args(image_file, wait=True, config_drive=True))
    assert not drive_of(agent, off["uuid"]).exists() and drive_of(agent, on["uuid"]).exists()
    assert (agent.state_dir / "instances" / off["uuid"] / "disk").exists()


def test_the_ec2_versions_on_the_drive_are_the_operators_choice(make_agent: Any, image_file: Path,
                                                                tmp_path: Path) -> None:
    agent = make_agent(config='[guest]\nconfig_drive_skip_versions = ["2009-04-04"]\n')
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    tree = tmp_path / "tree"
    extract(drive_of(agent, rec["uuid"]), tree)
    assert {p.name for p in (tree / "ec2").iterdir()} == set(configdrive.EC2_VERSIONS) - {"2009-04-04"}


def test_attach_and_detach_port_remake_the_drive(net_agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    agent = net_agent
    p1 = _port("10.93.0.5", "fa:16:3e:00:93:05", "cd3", gateway="10.93.0.1")
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, networks=[p1]))
    drive = drive_of(agent, rec["uuid"])
    assert [x["vif_id"] for x in cloud_init_reads(drive, tmp_path, {})["networkdata"]["links"]] == [p1["id"]]
    p2 = _port("10.94.0.7", "fa:16:3e:00:94:07", "cd4", dns_nameservers=["10.94.0.2"])
    agent.call("instance.attach_port", {"uuid": rec["uuid"], "port": p2})
    nd = cloud_init_reads(drive, tmp_path, {})["networkdata"]
    assert [(x["vif_id"], x["ethernet_mac_address"]) for x in nd["links"]] == [
        (p1["id"], "fa:16:3e:00:93:05"), (p2["id"], "fa:16:3e:00:94:07")]
    assert [n["ip_address"] for n in nd["networks"]] == ["10.93.0.5", "10.94.0.7"]
    assert nd["services"] == [{"type": "dns", "address": "10.94.0.2"}]
    agent.call("instance.detach_port", {"uuid": rec["uuid"], "port_id": p1["id"]})
    nd = cloud_init_reads(drive, tmp_path, {})["networkdata"]
    assert [x["vif_id"] for x in nd["links"]] == [p2["id"]]


def test_restart_remakes_a_deleted_config_drive(agent: AgentProcess, image_file: Path, tmp_path: Path) -> None:
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True, hostname="keep-me",
                                                  user_data=base64.b64encode(b"#!/bin/sh\necho hi\n").decode()))
    drive = drive_of(agent, rec["uuid"])
    drive.unlink()
    agent.restart()
    assert agent.call("instance.get", {"uuid": rec["uuid"]})["vm_state"] == "active"
    got = cloud_init_reads(drive, tmp_path, {})
    assert got["metadata"]["hostname"] == "keep-me" and got["metadata"]["uuid"] == rec["uuid"]
    assert base64.b64decode(got["userdata"]) == b"#!/bin/sh\necho hi\n"


def test_the_document_builder_is_pure() -> None:
    rec = InstanceRecord(uuid=str(uuid_mod.uuid4()), name="vm", project_id="p", vm_state="active", task_state=None,
                         power_state="running", flavor=Flavor(vcpus=1, memory_mb=64, disk_gb=1), image=Image(id="img"),
                         host="h", numa=None, created_at="t", updated_at="t", metadata={"a": "b"})
    ports = [msgspec.convert({**_port("10.95.0.5", "fa:16:3e:00:95:05", "n"), "network": {"id": "n"}}, Port)]
    boot = configdrive.Bootstrap(hostname="vm", user_data=b"u", key_pairs=[KeyPair(name="k", public_key=SSH_KEY)])
    before = msgspec.json.encode([rec, ports, boot])
    files = configdrive.instance_metadata(rec, ports, boot, default_mtu=1400)
    assert files == configdrive.instance_metadata(rec, ports, boot, default_mtu=1400)
    assert msgspec.json.encode([rec, ports, boot]) == before
    assert json.loads(files["openstack/latest/network_data.json"])["links"][0]["mtu"] == 1400
    assert files["openstack/latest/user_data"] == files["ec2/latest/user-data"] == b"u"
    # The metadata service's documents hold every EC2 version; a drive's leave out those skipped.
    assert "ec2/1.0/meta-data.json" in files
    drive = configdrive.instance_metadata(rec, ports, boot, default_mtu=1400, skip_ec2=["1.0"])
    assert drive == {p: d for p, d in files.items() if not p.startswith("ec2/1.0/")}
    assert all(isinstance(v, bytes) for v in files.values())


def test_images_of_one_layout_carry_each_their_own_files(tmp_path: Path) -> None:
    """The layout is made once; files of any size (none, a sector, a byte past it) read back
    whole by isoinfo in every image made from it."""
    from fastcompute.images import iso

    for sizes in ((0, 1, 2048), (2049, 0, 65535), (5, 4096, 1)):
        files = {"a/x.json": os.urandom(sizes[0]), "a/b/user_data": os.urandom(sizes[1]), "c": os.urandom(sizes[2])}
        out = tmp_path / f"{sizes}.iso"
        iso.write(out, files, "config-2")
        tree = tmp_path / f"tree{sizes}"
        extract(out, tree)
        assert {p: (tree / p).read_bytes() for p in files} == files


def test_a_first_image_is_written_in_place_and_a_later_one_replaces_it_whole(tmp_path: Path) -> None:
    """``new`` writes straight to the path (no temporary file is left or needed); an image
    already there is replaced by the new one whole, and is never the mix of both."""
    from fastcompute.images import iso

    first = {"openstack/latest/meta_data.json": b'{"uuid":"a"}', "openstack/latest/user_data": bytes(5000)}
    second = {"openstack/latest/meta_data.json": b'{"uuid":"b"}', "openstack/latest/user_data": b"short"}
    out = tmp_path / "disk.config"
    iso.write(out, first, "config-2", new=True)
    assert out.read_bytes() == iso.image(first, "config-2")
    assert out.stat().st_mode & 0o777 == 0o600
    # the zeros of the system area (32 KiB) are a hole, never allocated (the end of the file
    # takes a whole block of 4 KiB)
    assert out.stat().st_blocks * 512 <= out.stat().st_size - 32768 + 4096
    iso.write(out, second, "config-2", new=True)
    assert out.read_bytes() == iso.image(second, "config-2")
    assert out.stat().st_blocks * 512 <= out.stat().st_size - 32768 + 4096
    extract(out, tmp_path / "tree")
    assert (tmp_path / "tree/openstack/latest/user_data").read_bytes() == b"short"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.config", "tree"]


def test_a_kept_layout_serves_only_images_of_its_shape(tmp_path: Path) -> None:
    """Images of the same paths and lengths share one patched layout (it is kept); an image
    whose files stop sharing their bytes at the same lengths, or whose lengths change, is
    patched for its own, and every file of every image reads back whole."""
    from fastcompute.images import iso

    x, z = b"x" * 100, b"z" * 100
    # the second and third have the first's lengths of distinct data, shared by other files
    shapes = ({"a": x, "b": x, "c": z}, {"a": x, "b": z, "c": z}, {"a": z, "b": x, "c": z},
              {"a": x, "b": x, "c": b"y"}, {"a": x, "b": x, "c": z})
    for i, files in enumerate(shapes):
        out = tmp_path / f"{i}.iso"
        iso.write(out, files, "config-2", new=True)
        extract(out, tmp_path / f"tree{i}")
        assert {p: (tmp_path / f"tree{i}" / p).read_bytes() for p in files} == files
    # the first and the last images have one shape: the same layout bytes, their files after it
    assert (tmp_path / "0.iso").read_bytes() == (tmp_path / "4.iso").read_bytes()
