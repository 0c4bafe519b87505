"""medmesh device SDK (asyncio): see docs/device-protocol.md."""
