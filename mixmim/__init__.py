"""MixMIM reproduction and benchmark suite."""

import os

# libgomp (torch's OpenMP on Linux) spin-waits between parallel regions by default. On the
# 2-core built-in box that made a 2-thread training process ~15x slower whenever anything else
# shared the cores; waiting passively costs next to nothing when the process runs alone. The
# setting is read when OpenMP starts, so it has to be in place before torch is first imported:
# every stage script and the `mixmim` command import this package first. A value already in
# the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
