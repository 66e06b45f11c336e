"""The ZeroMQ transport: the agent's ROUTER/PUB server and the clients."""
