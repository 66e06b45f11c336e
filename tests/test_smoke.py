"""The agent starts, answers, and runs one instance through its life."""

from pathlib import Path

from agent_fixtures import AgentProcess, spawn_args


def test_one_instance_lifecycle(agent: AgentProcess, image_file: Path) -> None:
    rec = agent.call("instance.spawn", spawn_args(image_file, wait=True))
    assert rec["vm_state"] == "active" and rec["power_state"] == "running"
    uuid = rec["uuid"]
    assert agent.call("instance.stop", {"uuid": uuid})["vm_state"] == "stopped"
    assert agent.call("instance.delete", {"uuid": uuid}) == {"uuid": uuid, "deleted": True}
    assert agent.call("host.info")["usage"]["VCPU"] == 0
