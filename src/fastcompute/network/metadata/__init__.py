"""The metadata service: guests' requests to http://169.254.169.254/ answered by the agent.

``server`` holds the listeners and the HTTP answers; what an instance is told comes from
``compute.configdrive`` (the same documents as its config drive). See docs/NETWORK.md
("The metadata service").
"""

from fastcompute.network.metadata.server import Documents, Lookup, MetadataService, answer, documents_lookup

__all__ = ["Documents", "Lookup", "MetadataService", "answer", "documents_lookup"]
