"""TCP ports for jax.distributed's coordinator, without JAX (launch.py imports it)."""

from __future__ import annotations

import socket

LOOPBACK = '127.0.0.1'


def free_port(host: str = LOOPBACK) -> int:
  """A TCP port that nothing listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def port_problem(port: int, host: str = LOOPBACK) -> str | None:
  """Why the coordinator could not listen on host:port (another program's listener), or None.

  JAX's coordination service does not report it: process 0 ended with a segmentation
  fault, and the others, connected to the other program, aborted after their timeout.
  """
  family = socket.AF_INET6 if ':' in host else socket.AF_INET  # '::1': IPv6's loopback
  with socket.socket(family, socket.SOCK_STREAM) as s:
    # As a server binds: a port whose last connection is in TIME_WAIT is free.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind((host, port))
    except OSError as e:
      where = f'[{host}]' if ':' in host else host or '*'
      return f'{where}:{port} cannot be listened on ({e.strerror or e})'
  return None
