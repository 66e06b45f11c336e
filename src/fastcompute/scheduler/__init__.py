"""Scheduling: the fleet view, filters and weighers, and the Placement client."""

from fastcompute.scheduler.fleet import Endpoint, Group, HostView, NoValidHost, Scheduler, Weights, run_storm

__all__ = ["Endpoint", "Group", "HostView", "NoValidHost", "Scheduler", "Weights", "run_storm"]
