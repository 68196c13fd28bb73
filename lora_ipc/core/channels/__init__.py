"""Channels between processes: endpoint paths, peer identity, the guard against floods, the ZeroMQ
connection and the descriptor channel (SCM_RIGHTS over a Unix socket)."""
