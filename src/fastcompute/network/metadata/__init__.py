"""The metadata service: guests' requests to http://169.254.169.254/ answered by the agent.

``server`` holds the listeners and the HTTP answers, ``documents`` what an instance is told.
See docs/NETWORK.md ("The metadata service").
"""

from fastcompute.network.metadata.documents import Documents, instance_documents
from fastcompute.network.metadata.server import Lookup, MetadataService, answer, documents_lookup

__all__ = ["Documents", "Lookup", "MetadataService", "answer", "documents_lookup", "instance_documents"]
